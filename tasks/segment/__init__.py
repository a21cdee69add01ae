"""Long recordings become clips: stream blocks → speech regions (Silero VAD) → segments.

The entry point `segment_recording` is filled in by the segmentation core; transcripts.py (cue
sidecars) lives next to it. Nothing here imports torch at module import time.
"""

from __future__ import annotations
