from collections import Counter

import pytest

from cxrlt.errors import DataError
from cxrlt.labels import (
    TASK1_CLASSES,
    TASK1_TRAIN_COUNTS,
    TASK1_TRAIN_IMAGES,
    TASK2_CLASSES,
    frequency_groups,
    task_classes,
)


def test_label_spaces():
    assert len(TASK1_CLASSES) == 40 and len(set(TASK1_CLASSES)) == 40
    assert len(TASK2_CLASSES) == 26
    assert set(TASK1_TRAIN_COUNTS) == set(TASK1_CLASSES)
    assert TASK2_CLASSES.index("Nodule") < TASK2_CLASSES.index("Normal")


def test_groups_from_training_counts_match_the_published_split():
    g1 = Counter(frequency_groups(TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES).values())
    assert (g1["head"], g1["medium"], g1["tail"]) == (9, 15, 16)
    g2 = Counter(frequency_groups(TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, TASK2_CLASSES).values())
    assert (g2["head"], g2["medium"], g2["tail"]) == (9, 11, 6)


def test_groups_boundaries():
    g = frequency_groups({"a": 11, "b": 10, "c": 1, "d": 0.99}, 100)
    assert g == {"a": "head", "b": "medium", "c": "medium", "d": "tail"}


def test_unknown_task_lists_valid_ones():
    with pytest.raises(DataError, match="task1"):
        task_classes("task9")
