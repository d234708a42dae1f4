"""The output JSON of generate.py (video -> {clip_order, <clip>: {translation, hypothesis, ...}}), checked as the
tools that read one back take it: `generate.py --score_only` and `python -m signllava.compare`."""
from __future__ import annotations

from signllava.errors import brief
from signllava.layout import is_text


def check_output_json(output) -> dict:
    """`output` when every clip of every clip_order has a hypothesis and a reference (its "reference" when it has
    one, as the yes/no tasks' outputs do, else its translation) that are text, no clip is listed twice (it would
    be scored twice) and there is at least one clip; else a ValueError naming the first fault."""
    if not isinstance(output, dict) or not output:
        raise ValueError(f"not an output of generate.py (video -> {{clip_order, clips}}), got {brief(output, 40)}")
    clips = 0
    for v, vd in output.items():
        if not isinstance(vd, dict) or not isinstance(vd.get("clip_order"), list):
            raise ValueError(f"video {brief(v, 60)}: no clip_order list")
        seen = set()
        for c in vd["clip_order"]:
            entry = vd.get(c) if isinstance(c, str) else None
            if not isinstance(entry, dict):
                raise ValueError(f"video {brief(v, 60)} clip {brief(c, 60)}: named in clip_order but has no entry")
            if c in seen:
                raise ValueError(f"video {brief(v, 60)} clip {brief(c, 60)}: listed twice in clip_order")
            seen.add(c)
            for field in ("hypothesis", reference_field(entry)):
                if not isinstance(entry.get(field), str) or not is_text(entry[field]):
                    raise ValueError(f"video {brief(v, 60)} clip {brief(c, 60)}: {field} is "
                                     f"{brief(entry.get(field), 40)}, not text")
        clips += len(seen)
    if not clips:
        raise ValueError("holds no clip (every clip_order is empty)")
    return output


def reference_field(entry: dict) -> str:
    """The field a clip is scored against: the yes/no tasks' outputs carry a "reference", translation's its
    "translation"."""
    return "reference" if "reference" in entry else "translation"
