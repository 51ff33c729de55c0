"""Label spaces of the CXR-LT tasks and the training frequencies they are defined by.

One place for class names and orders: every other module asks here, and selects label
columns *by name* (the task-2 development CSV orders Normal and Nodule differently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cxrlt.errors import DataError

TASK1_CLASSES: tuple[str, ...] = (
    "Adenopathy", "Atelectasis", "Azygos Lobe", "Calcification of the Aorta", "Cardiomegaly",
    "Clavicle Fracture", "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum",
    "Fibrosis", "Fissure", "Fracture", "Granuloma", "Hernia", "Hydropneumothorax", "Infarction",
    "Infiltration", "Kyphosis", "Lobar Atelectasis", "Lung Lesion", "Lung Opacity", "Mass",
    "Nodule", "Normal", "Pleural Effusion", "Pleural Other", "Pleural Thickening",
    "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum", "Pneumothorax", "Pulmonary Embolism",
    "Pulmonary Hypertension", "Rib Fracture", "Round(ed) Atelectasis", "Subcutaneous Emphysema",
    "Support Devices", "Tortuous Aorta", "Tuberculosis",
)  # fmt: skip

_NOT_IN_TASK2 = {
    "Adenopathy", "Azygos Lobe", "Clavicle Fracture", "Fissure", "Granuloma", "Hydropneumothorax",
    "Infarction", "Kyphosis", "Lobar Atelectasis", "Pulmonary Embolism", "Pulmonary Hypertension",
    "Rib Fracture", "Round(ed) Atelectasis", "Tuberculosis",
}  # fmt: skip
TASK2_CLASSES: tuple[str, ...] = tuple(c for c in TASK1_CLASSES if c not in _NOT_IN_TASK2)

TASK3_CLASSES: tuple[str, ...] = ("Bulla", "Cardiomyopathy", "Hilum", "Osteopenia", "Scoliosis")

# CXR-LT 2023 (ICCV CVAMD): the 26 classes of Task 2 with "No Finding" instead of "Normal",
# in the order of the official files, and the official training counts (264,849 images).
TASK2023_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Calcification of the Aorta", "Cardiomegaly", "Consolidation", "Edema",
    "Emphysema", "Enlarged Cardiomediastinum", "Fibrosis", "Fracture", "Hernia", "Infiltration",
    "Lung Lesion", "Lung Opacity", "Mass", "No Finding", "Nodule", "Pleural Effusion",
    "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum",
    "Pneumothorax", "Subcutaneous Emphysema", "Support Devices", "Tortuous Aorta",
)  # fmt: skip
TASK2023_TRAIN_IMAGES = 264_849
TASK2023_TRAIN_COUNTS: dict[str, int] = dict(zip(TASK2023_CLASSES, (
    67_597, 4_361, 76_900, 16_038, 38_574, 4_255, 30_119, 1_158, 11_883, 4_049, 10_218, 2_533,
    79_931, 5_529, 41_869, 7_663, 69_240, 675, 3_369, 788, 48_093, 543, 14_983, 2_453, 89_140,
    3_499,
), strict=True))  # fmt: skip

TASKS: dict[str, tuple[str, ...]] = {
    "task1": TASK1_CLASSES,
    "task2": TASK2_CLASSES,
    "task3": TASK3_CLASSES,
    "cxrlt2023": TASK2023_CLASSES,
}

# Positives per class in the official CXR-LT 2024 train_labeled.csv (258,871 images).
TASK1_TRAIN_IMAGES = 258_871
TASK1_TRAIN_COUNTS: dict[str, int] = {
    "Support Devices": 83_899, "Lung Opacity": 74_659, "Cardiomegaly": 71_794,
    "Pleural Effusion": 64_252, "Atelectasis": 63_471, "Pneumonia": 43_744, "Edema": 36_137,
    "Normal": 32_885, "Enlarged Cardiomediastinum": 28_673, "Consolidation": 14_822,
    "Pneumothorax": 13_562, "Fracture": 11_193, "Infiltration": 9_431, "Rib Fracture": 8_704,
    "Nodule": 7_140, "Mass": 4_978, "Calcification of the Aorta": 4_161, "Hernia": 3_756,
    "Emphysema": 3_462, "Adenopathy": 3_137, "Pleural Thickening": 3_124,
    "Tortuous Aorta": 3_078, "Granuloma": 2_794, "Fissure": 2_672, "Lung Lesion": 2_202,
    "Subcutaneous Emphysema": 2_019, "Tuberculosis": 1_929, "Pulmonary Embolism": 1_565,
    "Fibrosis": 1_075, "Pulmonary Hypertension": 864, "Infarction": 710,
    "Pneumomediastinum": 694, "Kyphosis": 686, "Hydropneumothorax": 633, "Pleural Other": 580,
    "Pneumoperitoneum": 505, "Azygos Lobe": 191, "Clavicle Fracture": 158,
    "Round(ed) Atelectasis": 153, "Lobar Atelectasis": 126,
}  # fmt: skip

GROUPS = ("head", "medium", "tail")

HEAD_MIN_FRACTION = 0.10
TAIL_MAX_FRACTION = 0.01


def task_classes(task: str) -> tuple[str, ...]:
    """Class names of a task, in the task's official order."""
    try:
        return TASKS[task]
    except KeyError:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}") from None


def training_classes(task: str) -> tuple[str, ...]:
    """Classes a model for `task` is trained on: Task 3 (zero-shot) trains on Task 1's labels."""
    return task_classes("task1" if task == "task3" else task)


def frequency_groups(
    positives: Mapping[str, float] | Sequence[float] | np.ndarray,
    n_images: int,
    classes: Sequence[str] | None = None,
) -> dict[str, str]:
    """Head (>10 % of training images), medium (1-10 %), tail (<1 %) per class.

    Derived from training counts, never hard-coded: a fixed index list made for one label
    space (Task 1) is silently wrong for another (Task 2 orders and selects classes apart).
    """
    if isinstance(positives, Mapping):
        items = list(positives.items()) if classes is None else [(c, positives[c]) for c in classes]
    else:
        if classes is None:
            raise ValueError("classes are required when positives is a sequence")
        items = list(zip(classes, np.asarray(positives, dtype=float), strict=True))
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    groups = {}
    for name, count in items:
        frac = float(count) / n_images
        groups[name] = (
            "head" if frac > HEAD_MIN_FRACTION else "tail" if frac < TAIL_MAX_FRACTION else "medium"
        )
    return groups
