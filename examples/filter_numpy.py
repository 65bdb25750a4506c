"""Restore the faces of a video with ``frvideo.Filter``, frame by frame, the way a host
application does: PyAV decodes, the application hands each frame to the filter as an
RGB numpy array and gets the restored array back, PyAV encodes.

    python examples/filter_numpy.py IN.mp4 OUT.mp4 --model lite

(The command line, ``frvideo IN OUT --model lite``, does the same for files and also keeps
the audio, timestamps and bit depth; this script shows the API a host builds on.)
"""
import argparse
import sys

import av

import frvideo
from frvideo.errors import FrvideoError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", default="auto")
    p.add_argument("--detector", default="auto")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: all)")
    args = p.parse_args(argv)
    try:
        with av.open(args.input) as inp:
            src = inp.streams.video[0]
            rate = src.average_rate or 25
            # the filter before the output: a bad option or a missing weight file stops before any
            # output file exists. lookahead=0, batch_size=1 (the Filter's defaults): each call
            # returns its own frame
            with frvideo.Filter(model=args.model, detector=args.detector, fps=float(rate)) as restore, \
                    av.open(args.output, "w") as out:
                dst = out.add_stream("libx264", rate=rate)
                dst.width, dst.height = src.width, src.height
                # 4:2:0 needs even sizes
                dst.pix_fmt = "yuv420p" if src.width % 2 == 0 and src.height % 2 == 0 else "yuv444p"

                def write(rgb):
                    out.mux(dst.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))

                for i, frame in enumerate(inp.decode(src)):
                    if args.frames and i == args.frames:
                        break
                    restored = restore.process(frame.to_ndarray(format="rgb24"))
                    if restored is not None:  # None only while frames are held for look-ahead
                        write(restored)
                for restored in restore.flush():
                    write(restored)
                out.mux(dst.encode(None))
                stats = restore.stats
    except FrvideoError as exc:  # a bad option, a missing weight file, ...: one line
        print(f"filter_numpy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, av.error.FFmpegError) as exc:  # the input cannot be read, the output not written
        print(f"filter_numpy: error: {exc}", file=sys.stderr)
        return 3
    print(f"filter_numpy: {stats.frames} frames, {stats.faces} faces ({stats.faces_changed} changed by the model) "
          f"-> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
