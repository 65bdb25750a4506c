"""``--faces FILE.jsonl``: every tracked face of every frame, one JSON line per frame.

    {"frame": 12, "faces": [{"track": 0, "box": [x1, y1, x2, y2],
      "landmarks": [[x, y], ... 5 points], "score": 0.998, "bridged": false, "restored": true}]}

``bridged``: the detector missed the face there and the pipeline filled it in
between detections (or predicted it, in causal runs); ``restored``: the face was
chosen for restoration (``--min-face``, ``--only-largest``, ``--tracks``). Frames
come in order, every frame has a line (``faces`` may be empty). ``frvideo metrics
--boxes`` reads this format.

Written beside the target under a temporary name and renamed when the run
completes, like the video.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..errors import OutputError
from .tracker import TrackedFace


def face_record(face: TrackedFace, restored: bool) -> dict:
    return {"track": int(face.track_id), "box": [round(float(v), 2) for v in face.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
            "score": round(float(face.score), 4), "bridged": bool(face.bridged), "restored": restored}


def check_face_log_target(path: str, video_target: str) -> None:
    """Fail before any work if the faces file cannot be written (or would overwrite the video)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"--faces: {path} is a directory")
    if target.exists() and not target.is_file():
        raise OutputError(f"--faces: {path} exists and is not a regular file")
    if video_target != "-" and target.resolve() == Path(video_target).resolve():
        raise OutputError("--faces would overwrite the output video; give another file")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"--faces: folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"--faces: folder is not writable: {parent}")


class FaceLogWriter:
    def __init__(self, path: str):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        try:
            self.file = open(self.tmp, "w", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write the faces file {path}: {exc.strerror or exc}") from None

    def __call__(self, index: int, faces: list[TrackedFace], chosen: list[TrackedFace]) -> None:
        ids = {id(f) for f in chosen}
        self.file.write(json.dumps({"frame": index, "faces": [face_record(f, id(f) in ids) for f in faces]}) + "\n")

    def finish(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def parse_face_log(lines) -> Optional[dict[int, list[dict]]]:
    """Frame index -> that frame's face records (each with at least ``box``, and ``track`` when
    the file has it) of a faces file's lines; None if the lines are not that format."""
    out: dict[int, list[dict]] = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        rec = json.loads(line)
        if not isinstance(rec, dict) or "frame" not in rec or not isinstance(rec.get("faces"), list):
            return None
        faces = []
        for f in rec["faces"]:
            box = [float(v) for v in f["box"][:4]]
            if len(box) != 4:
                raise ValueError("a box needs 4 numbers")
            faces.append({**f, "box": box})
        out[int(rec["frame"])] = faces
    return out
