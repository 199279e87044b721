"""The background never shares a dataset id with a category, whatever numbering the dataset uses."""

from __future__ import annotations

import pytest

from resnet_tasks.errors import UserError
from resnet_tasks.labels import NO_CATEGORY_ID, LabelSpace


def test_zero_based_category_ids_keep_their_own_ids_beside_the_background() -> None:
    space = LabelSpace.with_background(["car", "person"], [0, 1])
    assert space.category_ids == (NO_CATEGORY_ID, 0, 1)
    assert [space.category_id(i) for i in range(space.num_classes)] == [NO_CATEGORY_ID, 0, 1]


def test_a_detection_label_space_from_before_the_change_keeps_its_category_ids() -> None:
    saved = {"class_names": ["background", "cat", "dog"], "category_ids": [0, 3, 7], "background": True}
    space = LabelSpace.coerce(saved)
    assert space.category_ids == (0, 3, 7) and space.object_names == ("cat", "dog") and space.category_id(2) == 7


def test_a_segmentation_background_keeps_its_pixel_value() -> None:
    space = LabelSpace(("background", "road", "car"), (0, 10, 20), background=True)
    assert space.category_ids == (0, 10, 20)


def test_two_classes_with_one_id_are_refused() -> None:
    with pytest.raises(UserError, match="distinct category ids"):
        LabelSpace.with_background(["a", "b"], [4, 4])
