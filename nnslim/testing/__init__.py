"""Public test helpers: the Transform conformance kit."""

from .checks import (
    ALL_CHECKS,
    TransformCase,
    assert_same_state,
    check_atomic_failure,
    check_forward_shape,
    check_json_roundtrip,
    check_report_complete,
    check_save_load,
    check_split_gentler,
    check_transform,
    model_state,
    parametrize_with_checks,
)

__all__ = [
    "ALL_CHECKS",
    "TransformCase",
    "assert_same_state",
    "check_atomic_failure",
    "check_forward_shape",
    "check_json_roundtrip",
    "check_report_complete",
    "check_save_load",
    "check_split_gentler",
    "check_transform",
    "model_state",
    "parametrize_with_checks",
]
