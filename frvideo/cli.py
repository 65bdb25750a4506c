"""Command line: ``frvideo IN OUT [options]``, ``frvideo models``, ``frvideo metrics``.

Every user mistake ends as one line ``frvideo: error: ...`` and a documented
exit code (see errors.py and the README); no traceback, no partial output.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .argtypes import number
from .errors import (EXIT_INTERRUPTED, EXIT_OK, ConfigError, FrvideoError, UsageError)

SUBCOMMANDS = ("models", "metrics", "dataset", "train")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see `frvideo --help`)")


_fraction = number(float, 0.0, 1.0)
_non_negative = number(int, 0)
_positive = number(int, 1)
_unit_interval = number(float, 0.0, 1.0, high_open=True)  # a weight of the past: 1 would never let the present in
_positive_float = number(float, 0.0, low_open=True)


def _strength(text: str):
    """--strength: 'auto' (None) or a number in [0, 1]."""
    if str(text).strip().lower() == "auto":
        return None
    return _fraction(text)


def _track_list(text: str) -> set[int]:
    try:
        return {int(t) for t in text.split(",") if t.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of track ids") from None


def build_parser() -> _Parser:
    p = _Parser(prog="frvideo", description="Restore faces in a video, streaming. Other commands: "
                "`frvideo models` (list/fetch weights), `frvideo metrics REF OUT` (flicker, PSNR/SSIM), "
                "`frvideo dataset SRC... --out DIR` (face crops for training), `frvideo train CONFIG.yaml`.")
    p.add_argument("input", help="input video file, URL, or - for a y4m stream on stdin")
    p.add_argument("output", help="output file (container from the extension), or - for y4m on stdout")
    p.add_argument("--version", action="version", version=f"frvideo {__version__}")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="auto", help="restoration model (default auto: best with weights installed)")
    g.add_argument("--weights", help="weight file for --model (overrides $FRVIDEO_HOME/weights)")
    g.add_argument("--fidelity", type=_fraction, help="0 = quality .. 1 = fidelity (CodeFormer w, VQFR v2 ratio)")
    g.add_argument("--steps", type=_non_negative, help="diffusion models (ldbfr): DDIM steps (default: the model's; "
                                                       "0 = skip the diffusion)")
    g.add_argument("--fresh-noise", action="store_true",
                   help="diffusion models: new noise every frame instead of noise locked per track (flickers; "
                        "for comparisons)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on GPU, fp32 on CPU")
    g.add_argument("--batch-size", type=_positive, default=4, help="faces per model call (default 4)")
    g = p.add_argument_group("faces")
    g.add_argument("--detector", default="auto", help="auto, retinaface-resnet50, retinaface-mobile, yunet, embedded (built in)")
    g.add_argument("--detector-weights", help="weight file for --detector")
    g.add_argument("--detect-size", type=int, help="shrink frames to this longer side for detection "
                   "(default 640; 0 = full resolution, finds smaller faces, slower)")
    g.add_argument("--min-face", type=int, default=24, help="skip faces smaller than this many pixels (default 24)")
    g.add_argument("--only-largest", action="store_true", help="restore only the largest face of each frame")
    g.add_argument("--tracks", type=_track_list, help="restore only these track ids (see --draw), e.g. 0,2")
    g.add_argument("--draw", action="store_true", help="draw boxes, landmarks and track ids on the output")
    g.add_argument("--bridge", type=_non_negative, default=8, metavar="N",
                   help="a face the detector misses for up to N frames stays restored: landmarks interpolated "
                        "between the detections around the gap (predicted with --lookahead 0); 0 = off (default 8)")
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
    g.add_argument("--temporal-margin", type=float, default=0.3,
                   help="log-probability margin another token needs to replace the current one")
    g.add_argument("--temporal-strength", type=_unit_interval, default=0.8,
                   help="full: weight of the previous restored face where nothing moved, 0-0.99 (default 0.8)")
    g.add_argument("--temporal-threshold", type=_positive_float, default=0.08,
                   help="full: change in the input face (0-1 of the pixel range, motion compensated) above which "
                        "the face filter follows the new restoration (default 0.08)")
    g.add_argument("--smooth-landmarks", action=argparse.BooleanOptionalAction, default=True,
                   help="smooth landmarks per track so the aligned crop stays still (default on)")
    g.add_argument("--lookahead", type=int, default=4,
                   help="frames of look-ahead for landmark smoothing (default 4; 0 = causal, for live)")
    g = p.add_argument_group("reference (reference-based models: ented)")
    g.add_argument("--reference-frame", type=int, metavar="N",
                   help="use the largest face of frame N (0-based) of the input as every track's reference "
                        "(default: a keyframe chosen per track)")
    g.add_argument("--reference-image", metavar="PATH",
                   help="use the largest face of this image as every track's reference")
    g.add_argument("--reference-restorer", metavar="NAME",
                   help="restore each reference once with this model first (e.g. codeformer)")
    g = p.add_argument_group("encoding")
    g.add_argument("--codec", help="video encoder (default follows the input: h264 -> libx264, ...)")
    g.add_argument("--crf", type=float, help="quality for x264/x265/vp9/av1 (default 18 for x264)")
    g.add_argument("--preset", help="encoder preset (default medium)")
    g.add_argument("--pix-fmt", help="output pixel format (default: the input's, so bit depth is kept)")
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML file of options, or a preset name from configs/presets/")
    g.add_argument("--ignore-damage", action="store_true",
                   help="restore the readable part of a truncated or damaged input instead of stopping")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return p


def _apply_config(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    """--config values become defaults; flags on the command line still win."""
    from .models import load_preset

    first, _ = parser.parse_known_args(argv)
    if first.config:
        values = load_preset(first.config)
        dests = {a.dest for a in parser._actions}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in dests or dest in ("input", "output", "config", "help", "version"):
                raise ConfigError(f"{first.config}: unknown option {key!r}")
            action = next(a for a in parser._actions if a.dest == dest)
            if action.type is not None and value is not None and not isinstance(value, bool):
                try:
                    value = action.type(str(value) if not isinstance(value, list) else ",".join(map(str, value)))
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    raise ConfigError(f"{first.config}: bad value for {key!r}: {exc}") from None
            if action.choices and value not in action.choices:
                raise ConfigError(f"{first.config}: {key!r} must be one of {', '.join(action.choices)}")
            parser.set_defaults(**{dest: value})
    return parser.parse_args(argv)


def _device_and_dtype(device: str, precision: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r} (auto, cpu, cuda, cuda:N)")
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and device == "cpu":
        raise UsageError("--precision fp16 needs a GPU; on CPU use fp32 or bf16")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return device, dtype


def restore_command(argv: list[str]) -> int:
    from .faces.detect import load_detector
    from .io.reader import STDIO
    from .io.writer import EncodeOptions, check_output_target
    from .pipeline import PipelineOptions, run_file
    from .restore import auto_model_name, load_restorer

    args = _apply_config(build_parser(), argv)
    if args.input != STDIO and args.output != STDIO and Path(args.output).exists() \
            and Path(args.input).exists() and Path(args.output).resolve() == Path(args.input).resolve():
        raise UsageError("output would overwrite the input; choose another output path")
    if args.input != STDIO and not Path(args.input).exists() and "://" not in args.input:
        from .errors import InputError
        raise InputError(f"input not found: {args.input}")
    check_output_target(args.output)
    device, dtype = _device_and_dtype(args.device, args.precision)
    model = auto_model_name() if args.model == "auto" else args.model
    restorer = load_restorer(model, args.weights, device, dtype)
    detector = load_detector(args.detector, args.detector_weights, device, args.detect_size)
    reference_options = _reference_options(args, restorer, detector, device, dtype)
    _check_diffusion_options(args, restorer)
    options = PipelineOptions(
        batch_size=args.batch_size, fidelity=args.fidelity, min_face=args.min_face,
        only_largest=args.only_largest, track_ids=args.tracks, draw=args.draw, temporal=args.temporal,
        temporal_alpha=args.temporal_alpha, temporal_margin=args.temporal_margin, quiet=args.quiet,
        temporal_strength=args.temporal_strength, temporal_threshold=args.temporal_threshold,
        allow_damaged=args.ignore_damage, smooth_landmarks=args.smooth_landmarks, lookahead=args.lookahead,
        encode=EncodeOptions(codec=args.codec, crf=args.crf, preset=args.preset, pix_fmt=args.pix_fmt),
        steps=args.steps, fresh_noise=args.fresh_noise, bridge=args.bridge, strength=args.strength,
        keep_detail=args.keep_detail,
    )
    for key, value in reference_options.items():
        setattr(options, key, value)
    note = f"{model}/{detector.name} on {device}"
    if not args.quiet:
        print(f"frvideo: model {model}, detector {detector.name}, device {device} "
              f"({str(dtype).replace('torch.', '')})", file=sys.stderr)
    stats = run_file(args.input, args.output, restorer, detector, options, note, faces_log=args.faces)
    if not args.quiet:
        print(f"frvideo: {stats.frames} frames ({stats.frames_with_faces} with faces, {stats.frames_bridged} "
              f"bridged), {stats.faces} faces in {stats.tracks} tracks, mean strength {stats.mean_strength:.2f}, "
              f"{stats.fps:.1f} fps -> {args.output}", file=sys.stderr)
        for line in stats.references:  # reference-based models: the keyframe each track was restored with
            print(f"frvideo: {line}", file=sys.stderr)
    return EXIT_OK


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
    from .models import all_model_configs, load_model_config
    from .restore import backend_entry_points
    from .weights import fetch_to, find_local, weights_dir

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
    backends = backend_entry_points()
    print(f"weights folder: {weights_dir()}  (set $FRVIDEO_HOME to move it)")
    for kind in ("restorer", "detector"):
        print(f"\n{kind}s:")
        for c in sorted(all_model_configs(kind), key=lambda c: -c.priority):
            if kind == "restorer" and c.backend not in backends:
                state = f"backend {c.backend!r} not installed"
            elif c.weights is None:
                state = "ready (no weights needed)"
            elif (path := find_local(c)) is not None:
                state = f"ready: {path}"
            else:
                state = f"missing {c.weights.file}: {c.weights.url or 'no public download'}"
            print(f"  {c.name:<22} {state}")
            if c.description:
                print(f"  {'':<22} {c.description}")
    return EXIT_OK


def metrics_command(argv: list[str]) -> int:
    from .metrics import metrics_main
    return metrics_main(argv)


def dataset_command(argv: list[str]) -> int:
    from .train.dataset import dataset_main
    return dataset_main(argv)


def train_command(argv: list[str]) -> int:
    from .train.trainer import train_main
    return train_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            commands = {"models": models_command, "metrics": metrics_command,
                        "dataset": dataset_command, "train": train_command}
            return commands[argv[0]](argv[1:])
        return restore_command(argv)
    except FrvideoError as exc:
        print(f"frvideo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("frvideo: interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
