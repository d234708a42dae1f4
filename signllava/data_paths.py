"""Where a dataset's files are: today's layout by default, or the explicit paths the original's configs name.

    default                          D/annotation.<split>.json, D/<modality>/<name>.<split>.json (metadata)
    --annotation_file PATH           one file: PATH for every split, or with `{split}` in it, e.g.
                                     h2s.annotations.{split}.json
    --annotation_file train=A,dev=B  one file per split
    --features NAME=PATH[,...]       a modality's metadata file, `{split}` as above, or NAME.SPLIT=PATH for
                                     one split, e.g. sign2vec=sign2vec/finetune/run/metadata_sign2vec.{split}.json

Relative paths are under --data_dir, as the original joined its config's paths with its data_dir; absolute
paths are taken as they are. Modalities that --features does not name are still found as before: every
sub-folder of --data_dir with a metadata file for the split, named after the folder. The shard files of a
metadata file lie beside it (its name minus `metadata_`, `.json` -> `.<shard>.h5`), and so does its index
cache, wherever the file is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from signllava.layout import SPLITS, DataError, discover_modalities, modality_rank

ALL_SPLITS = "*"                     # a path that serves every split
SPLIT_FIELD = "{split}"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def _split_pairs(text: str, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for part in text.split(","):
        name, eq, path = part.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise ValueError(f"{flag}: {part.strip()!r} is not NAME=PATH")
        pairs.append((name.strip(), path.strip()))
    return pairs


def parse_annotation_spec(text: str | None) -> dict[str, str]:
    """'PATH' -> {'*': PATH}; 'train=A,dev=B' -> {'train': A, 'dev': B}."""
    if not text:
        return {}
    if not all(part.partition("=")[0].strip() in SPLITS and "=" in part for part in text.split(",")):
        return {ALL_SPLITS: text.strip()}
    return dict(_split_pairs(text, "--annotation_file"))


def parse_features_spec(text: str | None) -> dict[str, dict[str, str]]:
    """'sign2vec=P,pose.dev=Q' -> {'sign2vec': {'*': P}, 'pose': {'dev': Q}}."""
    out: dict[str, dict[str, str]] = {}
    if not text:
        return out
    for name, path in _split_pairs(text, "--features"):
        modality, dot, split = name.rpartition(".")
        if not dot:
            modality, split = name, ALL_SPLITS
        elif split not in SPLITS:
            raise ValueError(f"--features: {name!r}: after the dot comes a split ({', '.join(SPLITS)})")
        if not _NAME.match(modality):
            raise ValueError(f"--features: {modality!r} is not a modality name (letters, digits, _ and -)")
        if split in out.get(modality, {}):
            raise ValueError(f"--features: {name} given twice")
        out.setdefault(modality, {})[split] = path
    return out


def _for_split(by_split: dict[str, str], split: str) -> str | None:
    path = by_split.get(split, by_split.get(ALL_SPLITS))
    return None if path is None else path.replace(SPLIT_FIELD, split)


@dataclass(frozen=True)
class DataPaths:
    """The files of one dataset, split by split. Built from --data_dir and the two optional specs."""
    data_dir: Path
    annotations: dict[str, str] = field(default_factory=dict)          # split or '*' -> path
    features: dict[str, dict[str, str]] = field(default_factory=dict)  # modality -> split or '*' -> path

    @classmethod
    def from_specs(cls, data_dir: str | Path, annotation_file: str | None = None,
                   features: str | None = None) -> DataPaths:
        """Raises ValueError (a one-line message naming the flag) for a malformed spec."""
        return cls(Path(data_dir), parse_annotation_spec(annotation_file), parse_features_spec(features))

    @classmethod
    def of(cls, data: DataPaths | str | Path) -> DataPaths:
        return data if isinstance(data, DataPaths) else cls(Path(data))

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.data_dir / p

    def annotation(self, split: str) -> Path:
        path = _for_split(self.annotations, split)
        return self._resolve(path) if path is not None else self.data_dir / f"annotation.{split}.json"

    def has_split(self, split: str) -> bool:
        return self.annotation(split).is_file()

    def explicit_metadata(self, split: str) -> dict[str, Path]:
        """The modalities --features names for this split, with their metadata paths (whether or not they exist:
        reading a missing one is an error naming it)."""
        out = {}
        for modality, by_split in self.features.items():
            path = _for_split(by_split, split)
            if path is not None:
                out[modality] = self._resolve(path)
        return out

    def metadata(self, split: str) -> dict[str, Path]:
        """Every modality of the split -> its metadata file, in splice order: the explicit ones, plus the folders
        of --data_dir found as before (a folder named like an explicit modality is not looked into)."""
        found = discover_modalities(self.data_dir, split, skip=set(self.features))
        found.update(self.explicit_metadata(split))
        return dict(sorted(found.items(), key=lambda kv: modality_rank(kv[0])))

    def describe(self) -> str:
        """What differs from the default layout, for log lines (empty when nothing does)."""
        parts = []
        if self.annotations:
            parts.append("annotation " + ", ".join(f"{s}={p}" for s, p in self.annotations.items()))
        for m, by_split in self.features.items():
            parts.append(f"{m} " + ", ".join(f"{s}={p}" for s, p in by_split.items()))
        return "; ".join(parts)


def data_problems(data_dir: str | Path, annotation_file: str | None, features: str | None,
                  splits: list[str]) -> list[str]:
    """What makes the dataset unusable for `splits`, found from file names alone: run by the commands before any
    model loads or distributed start-up, each problem one line naming the flag and the file."""
    if not Path(data_dir).is_dir():
        return [f"--data_dir {data_dir}: no such directory"]
    try:
        paths = DataPaths.from_specs(data_dir, annotation_file, features)
    except ValueError as e:
        return [str(e)]
    problems = []
    for split in splits:
        ann = paths.annotation(split)
        if not ann.is_file():
            flag = f"--annotation_file {annotation_file}" if paths.annotations else f"--data_dir {data_dir}"
            hint = "" if paths.annotations else "; name another with --annotation_file"
            problems.append(f"{flag}: no annotation file for split {split!r} ({ann} not found{hint})")
        try:
            metadata = paths.metadata(split)
        except DataError as e:
            problems.append(str(e))
            continue
        for modality, path in paths.explicit_metadata(split).items():
            if not path.is_file():
                problems.append(f"--features {modality}: {path} not found (split {split!r})")
        if not metadata:
            problems.append(f"--data_dir {data_dir}: no modality folder has a metadata file *.{split}.json for split "
                            f"{split!r} (or name one with --features NAME=PATH)")
    return problems
