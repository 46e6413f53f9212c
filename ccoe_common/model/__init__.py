"""Backbone loading, expert modules and placement, and the CCoE model that holds them."""

from ccoe_common.model.ccoe import CCoEModel, MemoryReport
from ccoe_common.model.placement import Placement

__all__ = ["CCoEModel", "MemoryReport", "Placement"]
