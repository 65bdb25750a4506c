"""Command line: ``frvideo IN OUT [options]``, ``frvideo models``, ``frvideo metrics``.

Every user mistake ends as one line ``frvideo: error: ...`` and a documented
exit code (see errors.py and the README); no traceback, no partial output.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from . import __version__, interrupt
from .argtypes import number
from .errors import (EXIT_INTERRUPTED, EXIT_OK, ConfigError, FrvideoError, UsageError)

SUBCOMMANDS = ("models", "metrics", "dataset", "train", "batch")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see `frvideo --help`)")


_fraction = number(float, 0.0, 1.0)
_non_negative = number(int, 0)
_positive = number(int, 1)
_unit_interval = number(float, 0.0, 1.0, high_open=True)  # a weight of the past: 1 would never let the present in
_positive_float = number(float, 0.0, low_open=True)
_non_negative_float = number(float, 0.0)
# upper bounds where a huge value would hold the whole video in memory (frames wait for a full
# batch / for the look-ahead window) or ask for an image larger than any video
_batch = number(int, 1, 1024)
_lookahead = number(int, 0, 250)
_pixels = number(int, 0, 16384)
_steps = number(int, 0, 10000)
_any_number = number(float)
_threads = number(int, 1, 256)


def _strength(text: str):
    """--strength: 'auto' (None) or a number in [0, 1]."""
    if str(text).strip().lower() == "auto":
        return None
    return _fraction(text)


def _track_list(text: str) -> set[int]:
    try:
        ids = {int(t) for t in text.split(",") if t.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of track ids") from None
    if not ids:
        raise argparse.ArgumentTypeError("an empty list of track ids")
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"track ids are >= 0, not {min(ids)}")
    return ids


_track_list.range_checked = True


def build_parser() -> _Parser:
    p = _Parser(prog="frvideo", description="Restore faces in a video, streaming. Other commands: "
                "`frvideo models` (list/fetch weights), `frvideo metrics REF OUT` (flicker, PSNR/SSIM), "
                "`frvideo dataset SRC... --out DIR` (face crops for training), `frvideo train CONFIG.yaml`.")
    p.add_argument("input", help="input video file, URL (udp://, tcp://, rtmp://, http://, ...), or - for a y4m "
                                 "or nut stream on stdin")
    p.add_argument("output", help="output file (container from the extension), URL, or - for y4m (--format nut: "
                                  "nut, with audio) on stdout")
    p.add_argument("--version", action="version", version=f"frvideo {__version__}")
    add_restore_options(p)
    return p


def add_restore_options(p: argparse.ArgumentParser) -> None:
    """The restoration options (model, faces, blend, temporal, reference, encoding, run): the same
    for one file (``frvideo IN OUT``) and for every file of ``frvideo batch``."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="auto", help="restoration model (default auto: best with weights installed)")
    g.add_argument("--weights", help="weight file for --model (overrides $FRVIDEO_HOME/weights)")
    g.add_argument("--fidelity", type=_fraction, help="0 = quality .. 1 = fidelity (CodeFormer w, VQFR v2 ratio)")
    g.add_argument("--steps", type=_steps, help="diffusion models (ldbfr): DDIM steps (default: the model's; "
                                                       "0 = skip the diffusion)")
    g.add_argument("--fresh-noise", action="store_true",
                   help="diffusion models: new noise every frame instead of noise locked per track (flickers; "
                        "for comparisons)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"],
                   help="auto: bf16 (else fp16) on a GPU; on a CPU bf16 only where it has bf16 units "
                        "(avx512_bf16/AMX, Arm bf16), else fp32, and with --live int8 for a model that has "
                        "int8 graphs (lite); int8: those graphs, CPU only")
    g.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help="compute threads for torch, OpenCV and each codec (default: the usable cores less one "
                        "for decode, detection and encoding, which run side by side; both on 2 cores; 1..8)")
    g.add_argument("--batch-size", type=_batch, default=None,
                   help="faces per model call (default 4; on a CPU the model card's cpu_batch_size where it has one)")
    g = p.add_argument_group("faces")
    g.add_argument("--detector", default="auto", help="auto, retinaface-resnet50, retinaface-mobile, yunet, embedded (built in)")
    g.add_argument("--detector-weights", help="weight file for --detector")
    g.add_argument("--detect-size", type=_pixels, help="shrink frames to this longer side for detection "
                   "(default 640; 0 = full resolution, finds smaller faces, slower)")
    g.add_argument("--min-face", type=_pixels, default=24, help="skip faces smaller than this many pixels (default 24)")
    g.add_argument("--only-largest", action="store_true", help="restore only the largest face of each frame")
    g.add_argument("--tracks", type=_track_list, help="restore only these track ids (see --draw), e.g. 0,2")
    g.add_argument("--draw", action="store_true", help="draw boxes, landmarks and track ids on the output")
    g.add_argument("--bridge", type=_lookahead, default=None, metavar="N",
                   help="a face the detector misses for up to N frames stays restored: landmarks interpolated "
                        "between the detections around the gap (predicted with --lookahead 0); 0 = off "
                        "(default 8, causal runs 3: measured by bench/bridge.py)")
    g.add_argument("--faces", metavar="FILE.jsonl",
                   help="write every tracked face of every frame (track, box, landmarks, score, detected or "
                        "bridged) as JSON lines, the format `frvideo metrics --boxes` reads")
    g = p.add_argument_group("blend")
    g.add_argument("--strength", type=_strength, default=None, metavar="auto|S",
                   help="how much of the restoration reaches the video: auto (default) measures how degraded "
                        "each face is (blur, noise) and leaves a clean face almost as it was; 0..1 fixes it")
    g.add_argument("--keep-detail", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the input's own detail band by band wherever the restoration has less of it "
                        "(noise excepted) (default on)")
    g = p.add_argument_group("temporal")
    g.add_argument("--temporal", default="full", choices=["off", "tokens", "full"],
                   help="tokens: codebook-token smoothing per track; full: tokens plus a motion-compensated "
                        "filter of the restored face in time (default full)")
    g.add_argument("--temporal-alpha", type=_unit_interval, default=0.6, help="weight of the past in token smoothing")
    g.add_argument("--temporal-margin", type=_non_negative_float, default=0.3,
                   help="log-probability margin another token needs to replace the current one")
    g.add_argument("--temporal-strength", type=_unit_interval, default=0.8,
                   help="full: weight of the previous restored face where nothing moved, 0-0.99 (default 0.8)")
    g.add_argument("--temporal-threshold", type=_positive_float, default=0.08,
                   help="full: change in the input face (0-1 of the pixel range, motion compensated) above which "
                        "the face filter follows the new restoration (default 0.08)")
    g.add_argument("--smooth-landmarks", action=argparse.BooleanOptionalAction, default=True,
                   help="smooth landmarks per track so the aligned crop stays still (default on)")
    g.add_argument("--lookahead", type=_lookahead, default=4,
                   help="frames of look-ahead for landmark smoothing (default 4; 0 = causal, for live)")
    g = p.add_argument_group("reference (reference-based models: ented)")
    g.add_argument("--reference-frame", type=_non_negative, metavar="N",
                   help="use the largest face of frame N (0-based) of the input as every track's reference "
                        "(default: a keyframe chosen per track)")
    g.add_argument("--reference-image", metavar="PATH",
                   help="use the largest face of this image as every track's reference")
    g.add_argument("--reference-restorer", metavar="NAME",
                   help="restore each reference once with this model first (e.g. codeformer)")
    g = p.add_argument_group("encoding")
    g.add_argument("--codec", help="video encoder (default follows the input: h264 -> libx264, ...); "
                                  "ffv1 or prores make an archival master (see Film and archival masters)")
    g.add_argument("--crf", type=_any_number, help="quality for x264/x265/vp9/av1 (default 18 for x264)")
    g.add_argument("--preset", help="encoder preset (default medium)")
    g.add_argument("--pix-fmt", help="output pixel format (default: the input's, so bit depth is kept)")
    _add_film_arguments(p)
    _add_stream_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML file of options, or a preset name from configs/presets/")
    g.add_argument("--ignore-damage", action="store_true",
                   help="restore the readable part of a truncated or damaged input instead of stopping")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _add_film_arguments(p: _Parser) -> None:
    """Film and archival masters (frvideo/film.py, frvideo/io/masters.py)."""
    g = p.add_argument_group("film")
    g.add_argument("--gray", action=argparse.BooleanOptionalAction, default=None,
                   help="black and white: restore luma only, chroma left exactly as decoded (no colour cast); "
                        "default: detected from the first frames (neutral chroma); --no-gray restores colour")
    g.add_argument("--grain", choices=["off", "match"], default="off",
                   help="match: measure the film grain around each face and add the grain the restored face "
                        "lacks (same std per brightness, same grain size); default off")
    g.add_argument("--deinterlace", action="store_true",
                   help="deinterlace before restoring (FFmpeg bwdif, one frame per frame, same timestamps); "
                        "default: interlaced input stays interlaced, field order kept")


def _film_summary(stats) -> list[str]:
    lines = []
    if stats.gray:
        how = "detected from the first frames" if stats.gray_detected else "--gray"
        lines.append(f"black and white ({how}): restored on luma only, chroma as decoded")
    if stats.grain_faces:
        lines.append(f"grain matched on {stats.grain_faces} faces, mean grain std "
                     f"{255 * stats.grain_sum / stats.grain_faces:.1f}/255")
    return lines


# -- streams and --live (see live.py) ---------------------------------------------

def _key_value(text: str) -> tuple[str, str]:
    """--input-option / --output-option: KEY=VALUE, handed to FFmpeg as it is."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. listen=1)")
    return key.strip(), value


_latency_ms = number(float, 1.0, 60000.0)
_timeout_s = number(float, 0.0, 86400.0)
_stats_s = number(float, 0.0, 86400.0)
DEFAULT_MAX_LATENCY_MS = 200.0


def _add_stream_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streams")
    g.add_argument("--input-format", metavar="FMT",
                   help="FFmpeg demuxer or capture device of the input (e.g. mpegts on stdin, lavfi, v4l2); "
                        "default: probed (stdin: y4m or nut, from its first bytes)")
    g.add_argument("--input-option", type=_key_value, action="append", default=[], metavar="K=V",
                   help="FFmpeg option for opening the input, e.g. listen=1 for an rtmp:// server (repeatable)")
    g.add_argument("--input-timeout", type=_timeout_s, default=10.0, metavar="S",
                   help="a network input silent this many seconds ends the run cleanly (the output is "
                        "finished, exit 0); also the wait for it to start; 0 = wait forever (default 10)")
    g.add_argument("--format", metavar="FMT",
                   help="container of a URL or stdout output: y4m, nut (keeps audio), mpegts, flv, ... "
                        "(default: y4m on stdout, mpegts for udp/tcp, flv for rtmp)")
    g.add_argument("--output-option", type=_key_value, action="append", default=[], metavar="K=V",
                   help="FFmpeg option for opening the output, e.g. pkt_size=1316 (repeatable)")
    g = p.add_argument_group("live")
    g.add_argument("--live", action="store_true",
                   help="keep the input's pace: causal (no look-ahead), every frame out within --max-latency, "
                        "late faces carried from their track's last restoration or passed through; a file "
                        "input is paced at its frame rate")
    g.add_argument("--max-latency", type=_latency_ms, default=None, metavar="MS",
                   help=f"--live: latency budget per frame in milliseconds (default {DEFAULT_MAX_LATENCY_MS:g})")
    g.add_argument("--stats-interval", type=_stats_s, default=5.0, metavar="S",
                   help="--live: seconds between stats lines on stderr (0 = only the summary; default 5)")


def _check_stream_args(args: argparse.Namespace, check: "_OptionCheck", explicit: set) -> None:
    """The streams/live options: formats FFmpeg has, and what --live cannot take."""
    import av

    if args.input_format is not None:
        try:
            if not av.format.ContainerFormat(args.input_format, "r").is_input:
                raise ValueError(args.input_format)
        except ValueError:
            check.fail("input_format", f"FFmpeg cannot read {args.input_format!r} here "
                                       f"(e.g. mpegts, nut, flv, lavfi; capture devices where FFmpeg has them)")
    if not args.live:
        if args.max_latency is not None:
            check.fail("max_latency", "applies with --live")
        return
    if "lookahead" in explicit and args.lookahead:
        check.fail("lookahead", "--live is causal: it takes no look-ahead (leave --lookahead out or give 0)")


def _stream_options(args: argparse.Namespace):
    from .io.reader import InputOptions
    return InputOptions(format=args.input_format, options=dict(args.input_option), timeout=args.input_timeout,
                        announce=not args.quiet)


def _print_live_summary(args, stats, live_stats) -> None:
    from .live import describe
    print(f"frvideo: live: {describe(live_stats, live_stats.seconds)}", file=sys.stderr)


NOT_IN_CONFIG = ("input", "output", "config", "help", "version")


def _config_value(action: argparse.Action, key: str, value, source: str):
    """One config entry, checked as strictly as the same option on the command line (same type
    and range parsers), plus YAML's own pitfalls: booleans only for flags, no lists where a
    single value goes, no null."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {why}")

    if action.nargs == 0:  # a flag (--draw, --smooth-landmarks/--no-smooth-landmarks)
        if not isinstance(value, bool):
            raise bad(f"must be true or false, not {value!r}")
        if isinstance(action, argparse._StoreTrueAction) and value is False:
            return False
        return value
    if value is None:
        raise bad("has no value (remove the line to keep the default)")
    if isinstance(value, bool):
        raise bad(f"must be a value, not {str(value).lower()} (only on/off options take true/false)")
    if isinstance(action, argparse._AppendAction):  # --input-option: one K=V text or a list of them
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise bad(f"must be KEY=VALUE texts, not {value!r}")
        try:
            return [action.type(str(v)) for v in items]
        except argparse.ArgumentTypeError as exc:
            raise bad(str(exc)) from None
    if isinstance(value, list):
        if action.type is not _track_list:
            raise bad(f"must be a single value, not a list {value!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad(f"must be a list of track ids (whole numbers), not {value!r}")
        text = ",".join(map(str, value)) if value else ""
    elif isinstance(value, (int, float, str)):
        text = str(value)
    else:
        raise bad(f"must be a number or a text, not a {type(value).__name__}")
    if action.type is not None:
        try:
            converted = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise bad(str(exc)) from None
    else:
        converted = text
    if action.choices and converted not in action.choices:
        raise bad(f"must be one of {', '.join(map(str, action.choices))}, not {converted!r}")
    return converted


def _explicit_dests(argv: list[str], make_parser=build_parser) -> set[str]:
    """The options the command line itself sets (a --config value only fills in the others)."""
    parser = make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _parse_restore_args(argv: list[str], make_parser=build_parser,
                        not_in_config=NOT_IN_CONFIG) -> tuple[argparse.Namespace, dict[str, str]]:
    """The parsed options and, for each option a --config file set, 'FILE: key' (so a value the
    file got wrong is reported against the file, exit 6, not as a command-line mistake).
    ``make_parser``: another parser holding the restore options (``frvideo batch``)."""
    from .models import load_preset

    parser = make_parser()
    first, _ = parser.parse_known_args(argv)
    origin: dict[str, str] = {}
    if first.config is not None:
        if not first.config.strip():
            raise UsageError("--config: the file name is empty")
        values = load_preset(first.config)
        explicit = _explicit_dests(argv, make_parser)
        actions = {a.dest: a for a in parser._actions}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if not isinstance(key, str) or dest not in actions or dest in not_in_config:
                raise ConfigError(f"{first.config}: unknown option {key!r}")
            if dest == "detector" and dest not in explicit and _is_shipped_preset(first.config):
                value = _installed_preset_detector(value, first.config)
            parser.set_defaults(**{dest: _config_value(actions[dest], str(key), value, first.config)})
            if dest not in explicit:
                origin[dest] = f"{first.config}: {key}"
    return parser.parse_args(argv), origin


# -- presets name only installed detectors ------------------------------------------------------

def _is_shipped_preset(name: str) -> bool:
    """``--config NAME`` names one of configs/presets/ (as ``load_preset`` resolves it), not a
    file of the user's (whose ``detector`` is the user's explicit choice, checked as given)."""
    return not Path(name).suffix and not Path(name).exists()


def _installed_preset_detector(value, source: str):
    """A shipped preset's ``detector``: kept when installed; a known detector
    whose weights are not installed (``yunet`` in the ``fast``/``live`` presets on an
    offline machine) is replaced by the best installed one, said in one stderr line.
    Anything else is left for the usual checks to report."""
    from .faces.detect import best_installed_detector, is_installed
    from .models import model_names

    if not isinstance(value, str) or value == "auto" or value not in model_names("detector") or is_installed(value):
        return value
    chosen = best_installed_detector()
    print(f"frvideo: {source} names detector {value!r}, which is not installed; using {chosen!r} "
          f"(the best installed detector)", file=sys.stderr)
    return chosen


def _apply_config(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    """--config values become defaults; flags on the command line still win."""
    return _parse_restore_args(argv)[0]


class _OptionCheck:
    """Reports a bad option value against where it came from: the command line (UsageError,
    exit 2) or the --config file (ConfigError, exit 6)."""

    def __init__(self, origin: dict[str, str], option_name: str = "--{}"):
        self.origin = origin
        self.option_name = option_name  # how a message names an option: "--{}" (CLI), "Filter: {}" (API)

    def fail(self, dest: str, message: str) -> None:
        if dest in self.origin:
            raise ConfigError(f"{self.origin[dest]}: {message}")
        name = dest.replace("_", "-") if self.option_name.startswith("--") else dest
        raise UsageError(f"{self.option_name.format(name)}: {message}")


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")


def _card_of_kind(check: _OptionCheck, dest: str, name: str, kind: str):
    """The model card NAME of KIND (restorer/detector), or a usage error listing the known ones."""
    from .models import load_model_config, model_names

    known = model_names(kind)
    if name not in known:
        other = "detector" if kind == "restorer" else "restorer"
        if name in model_names(other):
            what = "a face detector, not a restoration model" if kind == "restorer" else \
                "a restoration model, not a face detector"
            check.fail(dest, f"{name!r} is {what}")
        check.fail(dest, f"unknown {'model' if kind == 'restorer' else 'detector'} {name!r} "
                         f"(known: {', '.join(['auto', *known])})")
    return load_model_config(name)


def validate_restore_args(args: argparse.Namespace, origin: dict[str, str]) -> dict:
    """Every option and config value checked before any model loads or frame is read: files,
    names (models, detectors, encoders, presets, pixel formats), devices, and the combinations
    that only some models take. Returns what the checks found out (model name, device, ...)."""
    from .io.reader import STDIO, check_input_source, is_url, probe_input
    from .io.writer import EncodeOptionError, EncodeOptions, check_encode_options, check_output_target

    check = _OptionCheck(origin)
    _check_not_empty(args, check)
    check_input_source(args.input, args.input_format)
    if args.input != STDIO and args.output != STDIO and not is_url(args.input) and Path(args.input).exists():
        out = Path(args.output)
        if out.exists() and os.path.samefile(out, args.input) or out.resolve() == Path(args.input).resolve():
            raise UsageError("output would overwrite the input; choose another output path")
    check_output_target(args.output, args.format)
    if args.faces is not None:
        from .faces.facelog import check_face_log_target
        check_face_log_target(args.faces, args.output)

    checked = validate_model_args(args, check)

    # (codec, pix_fmt) from a file's header; None for pipes, URLs and what --input-format names
    probed = probe_input(args.input) if args.input_format is None else None
    input_codec, input_pix_fmt = probed or (("rawvideo", "yuv420p") if args.input == STDIO else ("", "yuv420p"))
    encode = EncodeOptions(codec=args.codec, crf=args.crf, preset=args.preset, pix_fmt=args.pix_fmt,
                           format=args.format, muxer_options=dict(args.output_option))
    try:
        check_encode_options(args.output, encode, input_codec, input_pix_fmt)
    except EncodeOptionError as exc:
        check.fail(exc.option, str(exc))
    return {**checked, "encode": encode}


def _check_not_empty(args: argparse.Namespace, check: _OptionCheck) -> None:
    for action in build_parser()._actions:  # text options: an empty value is never meant
        value = getattr(args, action.dest, None)
        if action.dest not in ("input", "output") and isinstance(value, str) and not value.strip():
            check.fail(action.dest, "must not be empty")


def validate_model_args(args: argparse.Namespace, check: _OptionCheck) -> dict:
    """The checks of validate_restore_args that need no input or output (device, precision,
    model, detector, weight files, reference and diffusion options); shared with frvideo.Filter.
    Returns the model name, device and dtype."""
    from .io.reader import STDIO
    from .restore import auto_model_name, backend_class
    from .weights import check_weights_path

    if not _DEVICE.match(args.device):
        check.fail("device", f"unknown device {args.device!r} (auto, cpu, cuda, cuda:N)")
    device, dtype = _device_and_dtype(args.device, args.precision)

    card = _card_of_kind(check, "model", args.model, "restorer") if args.model != "auto" else None
    model = card.name if card is not None else auto_model_name()
    if card is None:
        from .models import load_model_config
        card = load_model_config(model)
    backend = backend_class(card.backend)
    if args.weights is not None:
        if card.weights is None:
            check.fail("weights", f"model {model!r} takes no weight file")
        check_weights_path(args.weights, "--weights")
    if args.precision == "auto" and getattr(args, "live", False) and _int8_fits(card, device, args):
        # live values time: a model with int8 graphs takes them when ONNX Runtime is installed
        # (lite: 1.8x faster a face, face PSNR within 0.03 dB of fp32; plugins/lite/RECIPE.md "int8")
        from .restore import INT8
        dtype = INT8
    if args.precision == "int8":
        from .restore import int8_hint
        if not card.int8:
            check.fail("precision", f"int8 is not available for {model!r} ({int8_hint()})")
        if not _int8_fidelity_fits(card, args.fidelity):
            check.fail("fidelity", f"{model}'s int8 graphs are built for --fidelity "
                                   f"{_int8_fidelity(card):g}; use --precision fp32 for another fidelity")
    if args.detector != "auto":
        detector_card = _card_of_kind(check, "detector", args.detector, "detector")
        if args.detector_weights is not None and detector_card.weights is None:
            check.fail("detector_weights", f"detector {args.detector!r} takes no weight file")
    if args.detector_weights is not None:
        check_weights_path(args.detector_weights, "--detector-weights")

    reference_given = [d for d in ("reference_frame", "reference_image", "reference_restorer")
                       if getattr(args, d) is not None]
    if reference_given and not backend.needs_reference:
        check.fail(reference_given[0], f"applies to reference-based models (ented), not to {model!r}")
    if args.reference_frame is not None and args.reference_image is not None:
        raise UsageError("give --reference-frame or --reference-image, not both")
    if args.reference_frame is not None and args.input == STDIO:
        check.fail("reference_frame", "needs a file input (stdin cannot be read twice); use --reference-image")
    if args.reference_image is not None:
        image = Path(args.reference_image)
        if not image.is_file():
            from .errors import InputError
            raise InputError(f"reference image not found (or not a file): {args.reference_image}")
    if args.reference_restorer is not None:
        other = _card_of_kind(check, "reference_restorer", args.reference_restorer, "restorer")
        if backend_class(other.backend).needs_reference:
            check.fail("reference_restorer", f"{args.reference_restorer} needs a reference itself")
    if not backend.stochastic:
        given = "steps" if args.steps is not None else "fresh_noise" if args.fresh_noise else None
        if given:
            check.fail(given, f"applies to diffusion models (ldbfr), not to {model!r}")
    return {"model": model, "device": device, "dtype": dtype}


def _int8_fits(card, device: str, args: argparse.Namespace) -> bool:
    """Could this run take the model's int8 graphs (--precision auto in live mode)?"""
    import importlib.util
    if not card.int8 or device != "cpu" or args.weights is not None or not _int8_fidelity_fits(card, args.fidelity):
        return False
    return importlib.util.find_spec("onnxruntime") is not None


def _int8_fidelity(card) -> float:
    """The fidelity a model's int8 decoder graph was built for (fixed in the graph)."""
    return float(card.int8.get("fidelity", 1.0))


def _int8_fidelity_fits(card, fidelity) -> bool:
    return fidelity is None or abs(fidelity - _int8_fidelity(card)) <= 1e-6


def _device_and_dtype(device: str, precision: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r} (auto, cpu, cuda, cuda:N)")
    if precision == "auto":
        precision = auto_precision(device)
    if precision == "fp16" and device == "cpu":
        raise UsageError("--precision fp16 needs a GPU; on CPU use fp32 or bf16")
    if precision == "int8":
        if device != "cpu":
            raise UsageError("--precision int8 runs on the CPU (ONNX Runtime graphs); add --device cpu")
        from .nn.int8 import require
        from .restore import INT8
        require()
        return device, INT8
    if precision == "bf16" and device == "cpu":
        from .hardware import native_bf16_cpu
        if not native_bf16_cpu():
            print("frvideo: warning: this CPU has no bf16 units (no avx512_bf16/amx_bf16), so bf16 is emulated "
                  "and many times slower than fp32 (measured on such a CPU: one batch of 4 CodeFormer faces "
                  "took over 580 CPU-s, a whole fp32 run of the clip 190-240); --precision auto picks fp32 here",
                  file=sys.stderr)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return device, dtype


def auto_precision(device: str) -> str:
    """--precision auto: bf16 on a GPU that has it (else fp16); on a CPU bf16 only with native
    bf16 units (frvideo.hardware), else fp32."""
    import torch

    from .hardware import native_bf16_cpu
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_bf16_cpu() else "fp32"


def _import_heavy() -> None:
    """Import the C/C++ extensions up front, with signals deferred (see interrupt.deferred);
    later imports inside the run (e.g. a plugin's on the first face) would otherwise be cut."""
    # OpenMP threads that wait for work sleep instead of spinning: on a machine other jobs keep
    # busy a spinning torch thread burns a core for nothing (must be set before torch loads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _keep_freed_memory()
    with interrupt.deferred():
        import av  # noqa: F401
        import cv2  # noqa: F401
        import torch  # noqa: F401

        from . import pipeline  # noqa: F401


def _keep_freed_memory() -> None:
    """Let the process reuse the memory of one model call in the next instead of handing it back
    to the kernel and faulting it in again (page faults cost ~30% of a CPU CodeFormer run's time,
    measured in bench/README.md "Against the official CodeFormer script"): glibc keeps blocks up
    to 32 MiB (its largest mmap threshold) on its heap and does not trim the heap; torch places
    its larger blocks on transparent huge pages (torch reads THP_MEM_ALLOC_ENABLE once, so this
    runs before torch loads). The command line only: frvideo.Filter leaves its host's allocator
    alone. Peak memory is unchanged in kind: freed memory is reused, not accumulated."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt  # glibc only; musl and macOS have no mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, (1 << 31) - 1)


def restore_command(argv: list[str]) -> int:
    args, origin = _parse_restore_args(argv)  # first: --help, --version and usage errors need no torch
    _import_heavy()
    from .pipeline import run_file
    from .restore import precision_name

    _check_stream_args(args, _OptionCheck(origin), _explicit_dests(argv) | set(origin))
    setup = prepare_restore(args, origin)
    device, dtype, model, threads = setup.device, setup.dtype, setup.model, setup.threads
    detector, restorer, options = setup.detector, setup.restorer, setup.options
    options.input = _stream_options(args)
    note = f"{model}/{detector.name} on {device}"
    if not args.quiet:
        print(f"frvideo: model {model}, detector {detector.name}, device {device} "
              f"({precision_name(dtype)}, {threads} thread{'s' if threads > 1 else ''})", file=sys.stderr)
    live_stats = None
    if args.live:
        from .live import LiveOptions, run_live
        live = LiveOptions(max_latency=(args.max_latency or DEFAULT_MAX_LATENCY_MS) / 1000.0,
                           stats_interval=args.stats_interval, quiet=args.quiet)
        stats, live_stats = run_live(args.input, args.output, restorer, detector, options, live,
                                     faces_log=args.faces)
    else:
        stats = run_file(args.input, args.output, restorer, detector, options, note, faces_log=args.faces)
    _print_summary(args, stats, live_stats)
    return EXIT_OK


def load_pipeline(args: argparse.Namespace, checked: dict, loaded: dict | None = None):
    """The detector, the restorer and the PipelineOptions of checked options (validate_restore_args
    or validate_model_args): what FacePipeline is built from, for the CLI and frvideo.Filter alike.
    ``loaded``: a cache of detectors and restorers kept by a caller that runs many files (batch)."""
    from .faces.detect import load_detector
    from .pipeline import PipelineOptions
    from .restore import load_restorer

    device, dtype, model = checked["device"], checked["dtype"], checked["model"]
    loaded = {} if loaded is None else loaded
    # the detector first: it is small, so a missing detector file is reported before a big model loads
    key = ("detector", args.detector, args.detector_weights, device, args.detect_size)
    if key not in loaded:
        loaded[key] = load_detector(args.detector, args.detector_weights, device, args.detect_size)
    detector = loaded[key]
    key = ("restorer", model, args.weights, device, dtype)
    if key not in loaded:
        loaded[key] = load_restorer(model, args.weights, device, dtype)
    restorer = loaded[key]
    reference_options = _reference_options(args, restorer, detector, device, dtype)
    _check_diffusion_options(args, restorer)
    options = PipelineOptions(
        batch_size=args.batch_size or _default_batch_size(restorer, device), fidelity=args.fidelity, min_face=args.min_face,
        only_largest=args.only_largest, track_ids=args.tracks, draw=args.draw, temporal=args.temporal,
        temporal_alpha=args.temporal_alpha, temporal_margin=args.temporal_margin, quiet=args.quiet,
        temporal_strength=args.temporal_strength, temporal_threshold=args.temporal_threshold,
        allow_damaged=args.ignore_damage, smooth_landmarks=args.smooth_landmarks, lookahead=args.lookahead,
        encode=checked["encode"],
        steps=args.steps, fresh_noise=args.fresh_noise, bridge=args.bridge, strength=args.strength,
        keep_detail=args.keep_detail,
        gray=args.gray, grain=args.grain, deinterlace=args.deinterlace,
    )
    for key, value in reference_options.items():
        setattr(options, key, value)
    return detector, restorer, options


def _default_batch_size(restorer, device: str) -> int:
    """4 faces per model call, gathered across frames and tracks; on a CPU a model may ask for
    fewer (codeformer: 1; measured in bench/README.md "Against the official CodeFormer script":
    batching its 512-px faces gains no speed on a CPU and costs ~0.6 GB per extra face in fp32)."""
    from .pipeline import PipelineOptions
    if not str(device).startswith("cuda") and restorer.cpu_batch_size:
        return restorer.cpu_batch_size
    return PipelineOptions.batch_size


class RestoreSetup:
    """What one restore run needs, from checked options: the loaded detector and restorer and the
    PipelineOptions (every job of ``frvideo batch``, in this process or a Ray worker)."""

    def __init__(self, model, device, dtype, threads, detector, restorer, options):
        self.model, self.device, self.dtype, self.threads = model, device, dtype, threads
        self.detector, self.restorer, self.options = detector, restorer, options


def prepare_restore(args: argparse.Namespace, origin: dict[str, str], loaded: dict | None = None) -> RestoreSetup:
    """Check every option, set the threads, load (or take from ``loaded``) the models, build the options."""
    checked = validate_restore_args(args, origin)
    from .hardware import apply_threads, default_threads
    threads = args.threads or default_threads()
    apply_threads(threads)
    _quiet_opencv()
    detector, restorer, options = load_pipeline(args, checked, loaded)
    return RestoreSetup(checked["model"], checked["device"], checked["dtype"], threads, detector, restorer, options)


def _print_summary(args: argparse.Namespace, stats, live_stats=None) -> None:
    if not args.quiet:
        if getattr(stats, "input_ended", None):
            print(f"frvideo: {args.input} ended: {stats.input_ended}", file=sys.stderr)
        print(f"frvideo: {stats.frames} frames ({stats.frames_with_faces} with faces, {stats.frames_bridged} "
              f"bridged), {stats.faces} faces in {stats.tracks} tracks, mean strength {stats.mean_strength:.2f}, "
              f"{stats.fps:.1f} fps -> {args.output}", file=sys.stderr)
        if stats.stage_seconds and live_stats is None:  # (live: the model runs in its own thread)
            total = sum(stats.stage_seconds.values()) or 1.0
            print("frvideo: main-thread time: " + ", ".join(
                f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in stats.stage_seconds.items()), file=sys.stderr)
        for line in _film_summary(stats):
            print(f"frvideo: {line}", file=sys.stderr)
        for line in stats.references:  # reference-based models: the keyframe each track was restored with
            print(f"frvideo: {line}", file=sys.stderr)
        if live_stats is not None:
            _print_live_summary(args, stats, live_stats)


def _check_diffusion_options(args, restorer) -> None:
    """--steps / --fresh-noise: only for stochastic backends, and checked before any frame is read."""
    if not restorer.stochastic:
        given = "--steps" if args.steps is not None else "--fresh-noise" if args.fresh_noise else None
        if given:
            raise UsageError(f"{given} applies to diffusion models (ldbfr), not to {restorer.name!r}")
    elif args.steps is not None:
        from .restore import RestoreContext
        try:
            restorer.sampling_steps(RestoreContext(steps=args.steps))
        except ConfigError as exc:
            raise UsageError(str(exc)) from None


def _reference_options(args, restorer, detector, device, dtype) -> dict:
    """PipelineOptions fields of --reference-frame/-image/-restorer (reference-based models only)."""
    given = [o for o, v in (("--reference-frame", args.reference_frame), ("--reference-image", args.reference_image),
                            ("--reference-restorer", args.reference_restorer)) if v is not None]
    if not given:
        return {}
    if not restorer.needs_reference:
        raise UsageError(f"{given[0]} applies to reference-based models (ented), not to {restorer.name!r}")
    if args.reference_frame is not None and args.reference_image is not None:
        raise UsageError("give --reference-frame or --reference-image, not both")
    from . import reference as ref
    from .restore import load_restorer

    out: dict = {}
    if args.reference_restorer is not None:
        other = load_restorer(args.reference_restorer, None, device, dtype)
        if other.needs_reference:
            raise UsageError(f"--reference-restorer {args.reference_restorer} needs a reference itself")
        out["reference_prepare"] = ref.reference_preparer(other, restorer.input_size)
    if args.reference_image is not None:
        out["reference"] = ref.reference_from_image(args.reference_image, detector, restorer.input_size)
        out["reference_label"] = f"reference image {args.reference_image}"
    elif args.reference_frame is not None:
        out["reference"] = ref.reference_from_frame(args.input, args.reference_frame, detector, restorer.input_size)
        out["reference_label"] = f"reference frame {args.reference_frame} (given)"
    return out


def models_command(argv: list[str]) -> int:
    # no torch here: listing and fetching weights read cards and files only (start-up < 0.5 s)
    from .models import all_model_configs, backend_entry_points, load_model_config
    from .weights import REPO_ROOT, fetch_to, find_local, weights_dir

    p = _Parser(prog="frvideo models", description="List models and their weights, or fetch weights.")
    sub = p.add_subparsers(dest="action")
    f = sub.add_parser("fetch", help="put a model's weights in DIR (to prepare an offline machine)")
    f.add_argument("name")
    f.add_argument("--dest", default=None, help=f"folder (default {weights_dir()})")
    sub.add_parser("list", help="list models (default)")
    args = p.parse_args(argv)
    if args.action == "fetch":
        config = load_model_config(args.name)
        path = fetch_to(config, Path(args.dest) if args.dest else weights_dir())
        print(f"{config.name}: {path}")
        return EXIT_OK
    from .faces.detect import detector_entry_points

    backends = {"restorer": backend_entry_points(), "detector": detector_entry_points()}
    print(f"weights folder: {weights_dir()}  (set $FRVIDEO_HOME to move it)")
    for kind in ("restorer", "detector"):
        print(f"\n{kind}s:")
        for c in sorted(all_model_configs(kind), key=lambda c: -c.priority):
            if c.backend not in backends[kind]:
                state = f"backend {c.backend!r} not installed"
            elif c.weights is None:
                state = "ready (no weights needed)"
            elif (path := find_local(c)) is not None:
                shipped = c.weights.shipped and path == REPO_ROOT / c.weights.shipped
                state = f"ready{' (shipped)' if shipped else ''}: {path}"
                if c.int8:
                    state += " (+ int8 graphs: --precision int8)"
            else:
                state = f"missing {c.weights.file}: {c.weights.url or 'no public download'}"
            print(f"  {c.name:<22} {state}")
            if c.description:
                print(f"  {'':<22} {c.description}")
    return EXIT_OK


def metrics_command(argv: list[str]) -> int:
    _import_heavy()
    from .metrics import metrics_main
    return metrics_main(argv)


def dataset_command(argv: list[str]) -> int:
    _import_heavy()
    from .train.dataset import dataset_main
    return dataset_main(argv)


def train_command(argv: list[str]) -> int:
    _import_heavy()
    from .train.trainer import train_main
    return train_main(argv)


# -- frvideo batch (frvideo/batch/): many files, journal, resume, provenance, report, Ray ---------

def batch_command(argv: list[str]) -> int:
    from .batch.command import batch_main  # parses first: --help and usage errors need no torch
    return batch_main(argv)


def _quiet_opencv() -> None:
    """OpenCV prints its own '[ WARN:0@...]' lines for things frvideo reports itself."""
    try:
        import cv2
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


def one_line(message: str) -> str:
    """A message as exactly one printable line (a value with a newline in it stays on it)."""
    text = " ".join(str(message).splitlines()) or "?"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _remove_partials() -> None:
    writer = sys.modules.get("frvideo.io.writer")
    if writer is not None:
        writer.remove_partials()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stderr is None:  # started with stderr closed: messages must not land in a stdout video
        sys.stderr = open(os.devnull, "w")
    interrupt.install()
    try:
        try:
            with warnings.catch_warnings():
                # library warnings (numpy, torch) are for developers; the user gets frvideo's lines
                warnings.simplefilter("ignore")
                if argv and argv[0] in SUBCOMMANDS:
                    commands = {"models": models_command, "metrics": metrics_command,
                                "dataset": dataset_command, "train": train_command,
                                "batch": batch_command}
                    return commands[argv[0]](argv[1:])
                return restore_command(argv)
        except FrvideoError as exc:
            _remove_partials()
            print(f"frvideo: error: {one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        except BrokenPipeError:
            # the reader of our stdout went away (e.g. `| head`): nothing more to say
            _remove_partials()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_INTERRUPTED
    except (interrupt.Interrupted, KeyboardInterrupt) as exc:
        _remove_partials()
        interrupt.report(interrupt.message(exc))
        return exc.exit_code if isinstance(exc, interrupt.Interrupted) else EXIT_INTERRUPTED
    finally:
        _remove_partials()
        interrupt.uninstall()


def entry() -> None:
    """The ``frvideo`` command (and ``python -m frvideo``): main(), then exit with its code. After
    an interruption (a signal, a closed pipe) the output is already removed and the message out;
    the process then leaves at once (os._exit after flushing) instead of finalising the
    interpreter while the decode, detection and encoder threads may still be inside OpenCV,
    torch or FFmpeg: a SIGTERM mid-run once ended in SIGSEGV (-11) after its message that way
    (tests/test_reliability.py, about 1 run in 100)."""
    code = main()
    if code > 128:  # 128 + the signal (SIGHUP 129, SIGINT 130, SIGTERM 143, ...)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass  # a closed or vanished pipe: nothing more can reach it
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
