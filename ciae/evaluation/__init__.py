"""Evaluation metrics: Panoptic Quality with panopticapi's exact rules."""

from ciae.evaluation.pq import PQAccumulator, format_table

__all__ = ["PQAccumulator", "format_table"]
