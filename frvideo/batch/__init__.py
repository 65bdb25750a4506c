"""``frvideo batch``: many files, unattended, resumable.

One driver around the same pipeline as ``frvideo IN OUT`` (pipeline.run_file):

* sources.py    what to restore: files, folders (recursively), CSV/JSONL manifests
* journal.py    ``DIR/.frvideo/journal.sqlite``: jobs, segments, tries, errors, hashes
* segments.py   keyframe-aligned segments with temporal warm-up; a segment's run; the
                join of the finished segments (packets, no re-encode) with the source's audio
* provenance.py hashes, the ``NAME.EXT.frvideo.json`` sidecar, ``--framemd5``, thumbnails
* report.py     ``DIR/report.html``
* engine.py     the scheduler: local (in this process) or Ray tasks; the journal is written
                by this process only, so a batch started on one resumes on the other
* command.py    the command line
"""
