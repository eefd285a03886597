"""Input files read in bounded chunks: csv, parquet, npz, or a folder of PNG/JPG images.

`open_input` checks what can be checked before any row is read (columns and their types, array
shape and dtype, image sizes and modes), so a wrong file fails before any work is done; its
chunks are then checked row by row with `check_rows`."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from normalcy.scoring.inputs import InputError, InputSpec, check_rows, preview_names

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A chunk never holds more than this many bytes of model input, whatever chunk_rows says, so
# that large images (c*h*w floats a row) keep memory bounded too.
MAX_CHUNK_BYTES = 256 * 2**20
ROW_ID = "row"  # id column of the output when the input has none: the 0-based row number
FILE_ID = "file"  # id column for an image folder: the file's path relative to the folder


@dataclass
class ScoringInput:
    """An opened, header-checked input: `chunks` yields (ids, rows) with rows already checked
    by `check_rows`; `total_rows` is None when it is unknown before reading (csv)."""

    source: str
    id_name: str
    total_rows: int | None
    chunks: Iterator[tuple[np.ndarray, np.ndarray]]
    notes: list[str] = field(default_factory=list)


def chunk_rows_for(spec: InputSpec, chunk_rows: int) -> int:
    """`chunk_rows`, lowered so a chunk of input stays under MAX_CHUNK_BYTES."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    row_bytes = spec.row_size * spec.dtype.itemsize
    return max(1, min(chunk_rows, MAX_CHUNK_BYTES // max(row_bytes, 1)))


def open_input(path: str | Path, spec: InputSpec, chunk_rows: int = 65536) -> ScoringInput:
    """Open a csv, parquet or npz file, or an image folder, and check what can be checked
    before reading rows (columns and their types, array shape and dtype, image sizes), so a
    wrong file fails before any work is done."""
    path = Path(path)
    rows = chunk_rows_for(spec, chunk_rows)
    if path.is_dir():
        return _open_image_folder(path, spec, rows)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    openers = {".csv": _open_csv, ".parquet": _open_parquet, ".pq": _open_parquet}
    if suffix in openers and spec.is_image:
        raise InputError(
            f"{path}: a table cannot feed an image model ({spec.describe()}); "
            "pass an .npz with X of that shape, or a folder of images"
        )
    opener = {**openers, ".npz": _open_npz}.get(suffix)
    if opener is None:
        raise InputError(
            f"{path}: unsupported input {suffix!r}; expected .csv, .parquet, .npz"
            + (" or a folder of PNG/JPG images" if spec.is_image else "")
        )
    return opener(path, spec, rows)


def _table_columns(
    path: Path, columns: list[str], spec: InputSpec
) -> tuple[list[str], str | None, list[str]]:
    """(feature columns in the model's order, id column or None, notes) for a table's header."""
    notes = []
    id_column = spec.id_column if spec.id_column in columns else None
    if spec.id_column and id_column is None:
        notes.append(
            f"the model's id column {spec.id_column!r} is not in {path.name}; rows are "
            f"identified by their 0-based number ({ROW_ID!r})"
        )
    if spec.feature_names:
        features = list(spec.feature_names)
        missing = [c for c in features if c not in columns]
        if missing:
            raise InputError(
                f"{path}: missing column(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                f"; the model expects the columns {preview_names(features)} (in any order)"
            )
    else:  # no names in the metadata: every column but the id, in file order
        features = [c for c in columns if c != id_column]
        if len(features) != spec.row_size:
            raise InputError(
                f"{path}: {len(features)} feature column(s) {preview_names(features)}; the model "
                f"expects {spec.row_size} (its metadata names none, so every column but the id "
                "column is a feature, in file order)"
            )
    ignored = [c for c in columns if c not in features and c != id_column]
    if ignored:
        notes.append(f"column(s) not used by the model are ignored: {ignored[:10]}")
    return features, id_column, notes


def _numeric_block(
    frame: pd.DataFrame, features: list[str], source: str, first_row: int
) -> np.ndarray:
    """The feature columns as one array; a non-numeric column is named with its first bad value."""
    dtypes = frame.dtypes
    for column in features:
        dtype = dtypes[column]
        if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
            series = frame[column]
            numeric = pd.to_numeric(series, errors="coerce")
            bad = np.flatnonzero(numeric.isna().to_numpy() & series.notna().to_numpy())
            where = (
                f"value {series.iloc[bad[0]]!r} at row {first_row + int(bad[0])}"
                if len(bad)
                else f"dtype {dtype}"
            )
            raise InputError(
                f"{source}: column {column!r} is not numeric ({where}); the model expects "
                "int or float values in every feature column"
            )
    return frame[features].to_numpy(dtype=np.float64)


def _open_csv(path: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; expected a header and at least one row")
    try:
        head = pd.read_csv(path, nrows=1)
    except Exception as exc:  # pandas raises several types for a malformed file
        raise InputError(f"{path}: cannot be read as csv ({exc})") from None
    if head.empty:
        raise InputError(f"{path}: no rows; expected a header and at least one row")
    header = list(head.columns)
    features, id_column, notes = _table_columns(path, header, spec)
    usecols = features + ([id_column] if id_column else [])

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        # Ids are read as text: a file's ids come back exactly as written (leading zeros too).
        reader = pd.read_csv(
            path,
            usecols=usecols,
            chunksize=chunk_rows,
            dtype={id_column: str} if id_column else None,
        )
        try:
            for frame in reader:
                X = _numeric_block(frame, features, str(path), start)
                ids = (
                    frame[id_column].to_numpy()
                    if id_column
                    else np.arange(start, start + len(frame))
                )
                yield ids, check_rows(X.reshape(len(X), *spec.shape), spec, str(path), start)
                start += len(frame)
        except pd.errors.ParserError as exc:
            raise InputError(f"{path}: malformed csv after row {start} ({exc})") from None
        finally:
            reader.close()

    return ScoringInput(str(path), id_column or ROW_ID, None, chunks(), notes)


def _open_parquet(path: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupted file
        raise InputError(f"{path}: cannot be read as parquet ({exc})") from None
    schema = parquet.schema_arrow
    features, id_column, notes = _table_columns(path, list(schema.names), spec)
    wrong = {
        c: str(schema.field(c).type)
        for c in features
        if not (
            pa.types.is_integer(schema.field(c).type) or pa.types.is_floating(schema.field(c).type)
        )
    }
    if wrong:
        raise InputError(
            f"{path}: non-numeric column(s) {wrong}; the model expects int or float columns"
        )
    total = parquet.metadata.num_rows
    if total == 0:
        raise InputError(f"{path}: no rows; expected at least one")
    usecols = features + ([id_column] if id_column else [])

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        try:
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=usecols):
                # zero_copy_only=False: nulls become NaN, which check_rows then names.
                X = np.column_stack(
                    [
                        batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                        for c in features
                    ]
                )
                ids = (
                    batch.column(id_column).to_numpy(zero_copy_only=False)
                    if id_column
                    else np.arange(start, start + batch.num_rows)
                )
                yield ids, check_rows(X.reshape(len(X), *spec.shape), spec, str(path), start)
                start += batch.num_rows
        finally:
            parquet.close()

    return ScoringInput(str(path), id_column or ROW_ID, total, chunks(), notes)


def _open_npz(path: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    """`X` is read from the archive as a stream, `chunk_rows` rows at a time, never whole
    (except a Fortran-ordered X, whose rows are not contiguous)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({exc})") from None
    members = [name.removesuffix(".npy") for name in archive.namelist()]
    if "X" not in members:
        archive.close()
        raise InputError(f"{path}: no array 'X' (found {members}); expected X [n, ...]")
    stream = archive.open("X.npy")
    try:
        version = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(stream)
    except Exception as exc:
        archive.close()
        raise InputError(f"{path}: X is not a readable numpy array ({exc})") from None
    problem = None
    if dtype.kind not in "iuf" or dtype.hasobject:
        problem = f"X has dtype {dtype}; the model expects numbers ({spec.dtype})"
    elif len(shape) < 1 or tuple(shape[1:]) != spec.shape:
        problem = f"X has shape {list(shape)}; the model expects {spec.describe()}"
    elif shape[0] == 0:
        problem = "X has no rows; expected at least one"
    if problem:
        archive.close()
        raise InputError(f"{path}: {problem}")
    n_rows = int(shape[0])
    row_bytes = spec.row_size * dtype.itemsize

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            if fortran_order and len(shape) > 1:
                X_all = np.load(path, allow_pickle=False)["X"]
            for start in range(0, n_rows, chunk_rows):
                n = min(chunk_rows, n_rows - start)
                if fortran_order and len(shape) > 1:
                    X = X_all[start : start + n]
                else:
                    buffer = stream.read(n * row_bytes)
                    if len(buffer) != n * row_bytes:
                        raise InputError(f"{path}: X is truncated at row {start}")
                    X = np.frombuffer(buffer, dtype=dtype).reshape(n, *spec.shape)
                yield np.arange(start, start + n), check_rows(X, spec, str(path), start)
        finally:
            stream.close()
            archive.close()

    return ScoringInput(str(path), ROW_ID, n_rows, chunks())


_IMAGE_MODES = {1: ("L", "I", "I;16", "F"), 3: ("RGB",)}


def _open_image_folder(folder: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    """Every PNG/JPG under `folder` (sorted by relative path), as raw pixel values in float32.
    Sizes and colour modes are checked from the file headers before any pixel is decoded:
    images are never resized, since that would silently change what the model sees."""
    from PIL import Image, UnidentifiedImageError

    if not spec.is_image:
        raise InputError(
            f"{folder}: a folder of images cannot feed a table model ({spec.describe()}); "
            "pass a .csv, .parquet or .npz file"
        )
    channels, height, width = spec.shape
    if spec.image_resize is not None:
        return _open_resized_images(folder, spec, chunk_rows)
    if channels not in _IMAGE_MODES:
        raise InputError(
            f"{folder}: the model takes {channels}-channel images, which PNG/JPG files do not "
            "hold; pass an .npz with X of shape [n, "
            f"{channels}, {height}, {width}]"
        )
    files = _image_files(folder)
    modes = _IMAGE_MODES[channels]
    for file in files:
        try:
            with Image.open(file) as image:
                size, mode = image.size, image.mode
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{file}: not a readable image ({exc})") from None
        if size != (width, height):
            raise InputError(
                f"{file}: image is {size[1]}x{size[0]} (HxW); the model expects {height}x{width}. "
                "normalcy does not resize: resize the images the way the training images were"
            )
        if mode not in modes:
            raise InputError(
                f"{file}: colour mode {mode}; the model expects {channels}-channel images "
                f"(mode {' or '.join(modes)})"
            )

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(files), chunk_rows):
            batch = files[start : start + chunk_rows]
            X = np.empty((len(batch), channels, height, width), dtype=np.float32)
            for i, file in enumerate(batch):
                with Image.open(file) as image:
                    pixels = np.asarray(image, dtype=np.float32)
                X[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            ids = np.asarray([f.relative_to(folder).as_posix() for f in batch])
            yield ids, check_rows(X, spec, str(folder), start)

    return ScoringInput(str(folder), FILE_ID, len(files), chunks())


def _image_files(folder: Path) -> list[Path]:
    """Every PNG/JPG under `folder`, sorted by relative path; refused when there is none."""
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise InputError(f"{folder}: no .png/.jpg/.jpeg images found (searched sub-folders too)")
    return files


def _open_resized_images(folder: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    """A model trained on an image folder: every image is decoded, converted to the model's
    channel count and resized to its input size exactly as the training images were
    (`normalcy.data.images.decode_image`). Each file's header is read before any scoring."""
    from normalcy.data.images import decode_image, read_header
    from normalcy.data.sources import DataError

    channels, height, width = spec.shape
    if channels not in (1, 3) or spec.image_resize != "bilinear":
        raise InputError(
            f"the model asks for {channels}-channel images resized by {spec.image_resize!r}; "
            "normalcy reads 1- or 3-channel images resized bilinearly"
        )
    files = _image_files(folder)
    try:
        for file in files:
            read_header(file)
    except DataError as exc:
        raise InputError(str(exc)) from None
    notes = [f"images are resized to {height}x{width} (bilinear), as the training images were"]

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(files), chunk_rows):
            batch = files[start : start + chunk_rows]
            X = np.empty((len(batch), channels, height, width), dtype=np.float32)
            try:
                for i, file in enumerate(batch):
                    X[i] = decode_image(file, channels, (height, width))
            except DataError as exc:
                raise InputError(str(exc)) from None
            ids = np.asarray([f.relative_to(folder).as_posix() for f in batch])
            yield ids, check_rows(X, spec, str(folder), start)

    return ScoringInput(str(folder), FILE_ID, len(files), chunks(), notes)
