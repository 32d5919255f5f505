"""The VQA data schema shared by training (`shirg-hf train`) and evaluation (`shirg-hf eval`).

A data set is a `datasets.save_to_disk` folder (a `Dataset` or a `DatasetDict` of splits) or a json / jsonl / csv /
parquet file, with the columns `image` (an Image feature, or a file path relative to the data file), `question`
(string), `answers` (the list of gold answer strings; training learns the first) and optionally `id`. A column
`answer` (one string) is accepted as an alias of `answers` = [answer] when there is no `answers` column. Images
are read by one loader for every entry point: the image processor's `load_image` (EXIF orientation, one frame).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REQUIRED_COLUMNS = ("image", "question", "answers")
ANSWER_ALIAS = "answer"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
STRING_DTYPES = ("string", "large_string")


def sha256_of_files(paths: list[Path], root: Path | None = None) -> str:
    """SHA-256 over the names (relative to `root`, else the base names) and the contents of `paths`, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root) if root else path.name).encode() + b"\0")
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_vqa_data(path: Path, what: str = "--data"):
    """(`Dataset` or `DatasetDict`, fingerprint) of a `save_to_disk` folder or a data file.

    The fingerprint changes with the content: it hashes every file of a folder (metadata and data) or the file;
    image files named by path are fingerprinted by `image_files_fingerprint`.
    """
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        fingerprint = sha256_of_files(sorted(file for file in path.rglob("*") if file.is_file()), root=path)
    elif path.suffix.lower() in FILE_BUILDERS:
        loaded = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path))
        fingerprint = sha256_of_files([path])
    else:
        raise ValueError(f"{what} {path}: expected a datasets.save_to_disk folder or a "
                         f"{'/'.join(sorted(FILE_BUILDERS))} file")
    return loaded, fingerprint


def pick_split(loaded, split: str | None, path: Path, what: str = "--data"):
    """(dataset, split name) of `loaded`: the named split of a `DatasetDict` (or its only one)."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{what} {path} has the splits {sorted(loaded)}; pick one with --split")
        return loaded[split], split
    if split is not None:
        raise ValueError(f"{what} {path} is a single data set without splits; leave out --split {split}")
    return loaded, None


def with_answers(dataset):
    """`dataset` with an `answers` list column: an `answer` string column (the documented alias) is wrapped."""
    columns = dataset.column_names
    if "answers" in columns or ANSWER_ALIAS not in columns:
        return dataset
    return dataset.map(lambda answer: {"answers": [answer]}, input_columns=[ANSWER_ALIAS],
                       remove_columns=[ANSWER_ALIAS])


def check_columns(dataset, where: str) -> None:
    """Raise ValueError unless the data set has image, question, answers (a list of strings) and at least one row."""
    import datasets

    columns = dataset.column_names
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise ValueError(
            f"{where} lacks the column(s) {missing}: it has {columns}. Expected image (an image or a path), "
            "question (string), answers (list of gold answer strings; a single-string column 'answer' is accepted "
            "instead) and optionally id; rename columns with dataset.rename_column(old, new)."
        )
    answers = dataset.features["answers"]
    is_string_list = isinstance(answers, (datasets.List, datasets.LargeList, datasets.Sequence)) and \
        getattr(answers.feature, "dtype", None) in STRING_DTYPES
    if not is_string_list:
        raise ValueError(f"{where}: column 'answers' must be a list of strings per row (e.g. [\"42\"]), got "
                         f"{answers}. Wrap single answers in a list.")
    if getattr(dataset.features["question"], "dtype", None) not in STRING_DTYPES:
        raise ValueError(f"{where}: column 'question' must hold strings, got {dataset.features['question']}")
    if len(dataset) == 0:
        raise ValueError(f"{where} has no rows")


def row_answers(row: dict, index: int = 0) -> list[str]:
    """The gold answers of one row (`answers`, or the alias `answer`), checked: a non-empty list of strings."""
    answers = row["answers"] if "answers" in row else [row[ANSWER_ALIAS]] if ANSWER_ALIAS in row else None
    if answers is None:
        raise ValueError(f"row {index} has no 'answers' (or 'answer') column; it has {sorted(row)}")
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"row {index}: 'answers' must be a non-empty list of strings, got {answers!r}")
    return list(answers)


def question_ids(dataset, path: Path) -> list:
    """The `id` column (unique values) or, without one, the row indices."""
    if "id" not in dataset.column_names:
        return list(range(len(dataset)))
    ids = dataset["id"]
    seen, repeated = set(), []
    for value in ids:
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise ValueError(f"--data {path}: ids must be integers or strings, got {value!r}")
        if value in seen:
            repeated.append(value)
        seen.add(value)
    if repeated:
        raise ValueError(f"--data {path}: the id column repeats {repeated[:5]}; every question needs a unique id "
                         "(results are resumed by id)")
    return list(ids)


def check_images(dataset, path: Path) -> None:
    """Raise ValueError unless `image` is an Image feature or holds paths that exist (relative to the data file)."""
    import datasets

    feature = dataset.features["image"]
    if isinstance(feature, datasets.Image):
        return
    if getattr(feature, "dtype", None) not in STRING_DTYPES:
        raise ValueError(f"--data {path}: column 'image' must be a datasets Image feature or image file paths, "
                         f"got {feature}")
    missing = [value for value in dataset["image"] if not image_path(value, path).is_file()]
    if missing:
        raise ValueError(f"--data {path}: {len(missing)} image file(s) not found, e.g. {missing[:3]} (relative paths "
                         f"are read from {path.parent})")


def image_files_fingerprint(dataset, data_path: Path) -> str:
    """SHA-256 of the image files the data set names by path (a path column, or Image entries without bytes)."""
    import datasets

    column = dataset.select_columns(["image"])
    if isinstance(column.features["image"], datasets.Image):
        column = column.cast_column("image", datasets.Image(decode=False))
    digest = hashlib.sha256()
    for batch in column.iter(batch_size=256):
        for value in batch["image"]:
            name = value if isinstance(value, str) else (value["path"] if value["bytes"] is None else None)
            if name is None:
                continue
            digest.update(name.encode() + b"\0")
            try:
                digest.update(sha256_of_files([image_path(name, data_path)]).encode())
            except OSError as error:  # unreadable: its row fails later with its own error
                digest.update(f"unreadable: {error.strerror}".encode())
    return digest.hexdigest()


def image_path(value: str, data_path: Path) -> Path:
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else data_path.parent / candidate


def image_sources(dataset, rows: list[int], data_path: Path) -> list:
    """The undecoded image of each row (bytes or a path), for the shared loader `load_image`.

    Image features are read with `decode=False`, so a broken image fails in its own row, not in `datasets`.
    """
    import datasets

    column = dataset.select(rows).select_columns(["image"])
    if isinstance(column.features["image"], datasets.Image):
        column = column.cast_column("image", datasets.Image(decode=False))
        return [value["bytes"] if value["bytes"] is not None else Path(value["path"]) for value in column["image"]]
    return [image_path(value, data_path) for value in column["image"]]


def absolute_image_paths(dataset, data_path: Path):
    """`dataset` with relative image paths made absolute (read from the data file's folder), Image features as is."""
    if getattr(dataset.features.get("image"), "dtype", None) not in STRING_DTYPES:
        return dataset
    return dataset.map(lambda value: {"image": str(image_path(value, data_path))}, input_columns=["image"])
