"""``frvideo.Filter`` in an OpenCV loop: frames are BGR arrays (``channels="bgr"``), from a
file or a camera, restored as they come and written with cv2.VideoWriter (or shown).

    python examples/filter_opencv.py IN.mp4 --out OUT.avi --model lite
    python examples/filter_opencv.py 0 --show --model lite          # camera 0, in a window (untested: no camera here)
"""
import argparse
import sys

import cv2

import frvideo
from frvideo.errors import FrvideoError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a video file, or a camera number")
    p.add_argument("--out", help="write the restored frames here (MJPG in .avi)")
    p.add_argument("--show", action="store_true", help="show the restored frames in a window (q quits)")
    p.add_argument("--model", default="auto")
    p.add_argument("--detector", default="auto")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: all)")
    args = p.parse_args(argv)
    cap = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
    if not cap.isOpened():
        print(f"filter_opencv: error: cannot open {args.source}", file=sys.stderr)
        return 3
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    n = 0
    try:
        with frvideo.Filter(model=args.model, detector=args.detector, channels="bgr", fps=fps) as restore:
            while not args.frames or n < args.frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                restored = restore.process(bgr)  # BGR in, BGR out, at once (lookahead 0)
                n += 1
                if args.out:
                    if writer is None:
                        h, w = restored.shape[:2]
                        writer = cv2.VideoWriter(args.out, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
                    writer.write(restored)
                if args.show:
                    cv2.imshow("frvideo", restored)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
    except FrvideoError as exc:
        print(f"filter_opencv: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    print(f"filter_opencv: {n} frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
