"""MedMNIST-layout .npz files: strict validation, and download of official files."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from common.data.types import Dataset, ImageSet
from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EXPECTED_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
SIZES = (28, 64, 128, 224)
MANUAL_URL = "https://zenodo.org/records/10519652"

# Label names of the single-label 2D flags (from MedMNIST v2's INFO).
_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": (
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "octmnist": (
        "choroidal neovascularization",
        "diabetic macular edema",
        "drusen",
        "normal",
    ),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "tissuemnist": (
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ),
    "organamnist": _ORGANS,
    "organcmnist": _ORGANS,
    "organsmnist": _ORGANS,
}
MULTI_LABEL = ("chestmnist",)
FLAGS_2D = tuple(sorted((*LABEL_NAMES, *MULTI_LABEL)))

_READ_ERRORS = (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error)


def _guess_flag(path: Path) -> str | None:
    """The MedMNIST flag a file name starts with (longest match), if any."""
    stem = path.name.lower()
    hits = [f for f in FLAGS_2D if stem.startswith(f)]
    return max(hits, key=len) if hits else None


def _check_labels(path: Path, key: str, labels: np.ndarray, n: int) -> np.ndarray:
    """Validate one labels array and return it as int64 (N,)."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(
            f"{path}: key '{key}' has dtype {labels.dtype}; expected integer class "
            "ids (e.g. uint8)"
        )
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{path}: key '{key}' has shape {labels.shape}: multi-label targets are "
            "unsupported; use a single-label dataset (labels (N,) or (N, 1))"
        )
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise DataError(
            f"{path}: key '{key}' has shape {labels.shape}; expected (N,) or (N, 1)"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != n:
        raise DataError(
            f"{path}: key '{key}' has {len(labels)} labels but the matching images "
            f"key has {n} images; they must match one to one"
        )
    if len(labels) and labels.min() < 0:
        raise DataError(
            f"{path}: key '{key}' has negative label {int(labels.min())}; labels "
            "must be class ids 0..K-1"
        )
    return labels


def _check_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    """Validate one images array and return it as uint8 NHWC."""
    if images.dtype != np.uint8:
        raise DataError(
            f"{path}: key '{key}' has dtype {images.dtype}; expected uint8 (0-255)"
        )
    if images.ndim == 3:
        images = images[..., None]
    elif not (images.ndim == 4 and images.shape[-1] in (1, 3)):
        raise DataError(
            f"{path}: key '{key}' has shape {images.shape}; expected (N, H, W) or "
            "(N, H, W, 3)"
        )
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{path}: key '{key}' has empty images {images.shape}")
    return images


def _check_generic_labels(
    path: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]], max_label: int
) -> None:
    """Generic class names: refuse ids no image has; warn on ids absent from train.

    A file whose labels are, say, {0, 7} would otherwise train an 8-class model
    with six classes that can never be learnt or predicted correctly.
    """
    present = np.unique(np.concatenate([lab for _, lab in parts.values()]))
    empty = sorted(set(range(max_label + 1)) - {int(c) for c in present})
    if empty:
        raise DataError(
            f"{path}: labels run to {max_label} but class id(s) {empty[:8]} have no "
            f"image in any split, which would make a model of {max_label + 1} "
            f"classes with empty ones; renumber the labels to 0..{len(present) - 1}"
        )
    in_train = {int(c) for c in np.unique(parts["train"][1])}
    absent = sorted(set(range(max_label + 1)) - in_train)
    if absent:
        log.warning("%s: class id(s) %s have no training images; the model "
                    "cannot learn them", path, absent[:8])


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every expected array of an .npz archive; corrupt files and missing keys fail."""
    try:
        z = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise DataError(
            f"{path} is not a readable .npz archive ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt, re-download or re-create it"
        ) from err
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array, not an .npz archive with keys "
            f"{list(EXPECTED_KEYS)}; save it with np.savez"
        )
    with z:
        missing = [k for k in EXPECTED_KEYS if k not in z.files]
        if missing:
            raise DataError(
                f"{path}: missing keys {missing}; expected keys {list(EXPECTED_KEYS)}"
            )
        raw = {}
        for k in EXPECTED_KEYS:
            try:
                raw[k] = z[k]
            except _READ_ERRORS as err:
                raise DataError(
                    f"{path}: key '{k}' cannot be read ({type(err).__name__}: "
                    f"{err}); the file is truncated or corrupt, re-download it"
                ) from err
    return raw


def _check_splits(
    path: Path, raw: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images uint8 NHWC, labels int64) per split, in one colour mode for all."""
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    channels = None
    for split in SPLITS:
        images = _check_images(path, f"{split}_images", raw[f"{split}_images"])
        labels = _check_labels(
            path, f"{split}_labels", raw[f"{split}_labels"], len(images)
        )
        if channels is not None and images.shape[-1] != channels:
            raise DataError(
                f"{path}: key '{split}_images' has {images.shape[-1]} channels, "
                f"'train_images' has {channels}; use one colour mode for all splits"
            )
        channels = images.shape[-1]
        parts[split] = (images, labels)
    if len(parts["train"][1]) == 0:
        raise DataError(f"{path}: key 'train_images' is empty; training needs images")
    return parts


def _class_names(
    path: Path, flag: str | None, parts: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[str, ...]:
    """The flag's label names, or class-0.. once the labels pass the generic checks."""
    max_label = max(int(lab.max(initial=-1)) for _, lab in parts.values())
    names = LABEL_NAMES.get(flag) if flag else None
    if names is not None and max_label >= len(names):
        key = next(
            f"{s}_labels" for s in SPLITS if parts[s][1].max(initial=-1) == max_label
        )
        raise DataError(
            f"{path}: key '{key}' has label {max_label} but {flag} has "
            f"{len(names)} classes (0..{len(names) - 1}); fix the labels"
        )
    if names is None:
        _check_generic_labels(path, parts, max_label)
    return names or tuple(f"class-{i}" for i in range(max(max_label + 1, 2)))


def load_npz(
    path: str | Path,
    image_size: int,
    source: str | None = None,
    name: str | None = None,
) -> Dataset:
    """Load and validate a MedMNIST-layout .npz; images resized to image_size."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"npz file not found: {path}; check data.source (npz:<path>, relative "
            "paths start at the working directory)"
        )
    flag = _guess_flag(path)
    parts = _check_splits(path, _read_arrays(path))
    classes = _class_names(path, flag, parts)
    sets = {
        s: ImageSet(np.ascontiguousarray(im), lab).resized(image_size)
        for s, (im, lab) in parts.items()
    }
    return Dataset(
        name=name or flag or path.stem,
        source=source or f"npz:{path}",
        classes=classes,
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
    )


def parse_medmnist_spec(spec: str) -> tuple[str, int]:
    """Split `<flag>[@size]` into (flag, size); reject unknown flags and sizes."""
    m = re.fullmatch(r"([a-z0-9]+)(?:@(\d+))?", spec)
    if not m:
        raise ConfigError(
            f"data.source 'medmnist:{spec}' is not valid; use medmnist:<flag>[@size]"
        )
    flag, size = m.group(1), int(m.group(2) or 28)
    if flag in MULTI_LABEL:
        raise DataError(
            f"data.source 'medmnist:{flag}' is multi-label; multi-label datasets are "
            f"unsupported, choose one of {', '.join(sorted(LABEL_NAMES))}"
        )
    if flag not in LABEL_NAMES:
        raise ConfigError(
            f"data.source 'medmnist:{flag}' is not a 2D MedMNIST flag; choose one of "
            f"{', '.join(sorted(LABEL_NAMES))}"
        )
    if size not in SIZES:
        raise ConfigError(
            f"data.source 'medmnist:{spec}' has size {size}; MedMNIST sizes are "
            f"{', '.join(map(str, SIZES))}"
        )
    return flag, size


def medmnist_filename(flag: str, size: int) -> str:
    """The official file name: `<flag>.npz` at 28 px, `<flag>_<size>.npz` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _md5(path: Path) -> str:
    """MD5 hex digest of a file (what MedMNIST publishes)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(flag: str, size: int, dest: Path) -> None:
    """Fetch the official file via the `medmnist` package's INFO and check its MD5."""
    fname = medmnist_filename(flag, size)
    hint = f"download {fname} from {MANUAL_URL} and put it at {dest}"
    try:
        import medmnist  # optional dependency (fedkd[online])
    except ImportError as err:
        raise DataError(
            f"MedMNIST file {dest} is missing and the 'medmnist' package is not "
            f"installed; pip install medmnist, or {hint}"
        ) from err
    suffix = "" if size == 28 else f"_{size}"
    info = medmnist.INFO.get(flag, {})
    url, md5 = info.get(f"url{suffix}"), info.get(f"MD5{suffix}")
    if not url or not md5:
        raise DataError(
            f"medmnist {getattr(medmnist, '__version__', '?')} has no url/MD5 for "
            f"{fname}; upgrade medmnist (>= 3.0), or {hint}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    log.info("downloading %s from %s", fname, url)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as fh:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                fh.write(chunk)
        got = _md5(tmp)
        if got != md5:
            raise DataError(
                f"downloaded {fname} has MD5 {got}, expected {md5}; retry, or {hint}"
            )
        os.replace(tmp, dest)
    except OSError as err:  # URLError, timeouts and disk errors are OSErrors
        raise DataError(
            f"MedMNIST file {dest} is missing and the download from {url} failed "
            f"({type(err).__name__}: {err}); {hint} (source: {url})"
        ) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def load_medmnist(spec: str, image_size: int, cache_dir: str | Path) -> Dataset:
    """Load `medmnist:<flag>[@size]` from cache_dir, downloading it when missing."""
    flag, size = parse_medmnist_spec(spec)
    path = Path(cache_dir).expanduser() / medmnist_filename(flag, size)
    if not path.is_file():
        _download(flag, size, path)
    return load_npz(path, image_size, source=f"medmnist:{spec}", name=flag)
