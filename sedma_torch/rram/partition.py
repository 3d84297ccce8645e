"""Tilings of a matrix onto crossbars and crossbar utilisation.

Crossbar utilisation ("memory utilisation efficiency" of layer 1) is
used cells / allocated cells, counting each weight once (a differential pair
allocates two cells per weight and uses two, so the ratio is the same).
The memory-guided choice among tilings (SPEC.md Eq. 4) builds on these helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tiling:
    """A regular tiling of an (rows x cols) matrix onto (tile_rows x tile_cols) crossbars."""

    rows: int
    """Matrix rows mapped to word lines (inputs)."""
    cols: int
    """Matrix columns mapped to bit lines (outputs)."""
    tile_rows: int
    tile_cols: int

    @property
    def row_tiles(self) -> int:
        return math.ceil(self.rows / self.tile_rows)

    @property
    def col_tiles(self) -> int:
        return math.ceil(self.cols / self.tile_cols)

    @property
    def tiles(self) -> int:
        return self.row_tiles * self.col_tiles

    @property
    def allocated_cells(self) -> int:
        return self.tiles * self.tile_rows * self.tile_cols

    @property
    def utilisation(self) -> float:
        return crossbar_utilisation(
            self.rows * self.cols, self.tiles, self.tile_rows, self.tile_cols
        )


def crossbar_utilisation(used_cells: int, tiles: int, tile_rows: int, tile_cols: int) -> float:
    """used cells / (tiles * tile_rows * tile_cols), in [0, 1]."""
    if tiles <= 0 or tile_rows <= 0 or tile_cols <= 0:
        raise ValueError(
            f"tiles, tile_rows, tile_cols must be positive, got {tiles}, {tile_rows}, {tile_cols}"
        )
    allocated = tiles * tile_rows * tile_cols
    if not 0 <= used_cells <= allocated:
        raise ValueError(f"used_cells={used_cells} must be in [0, allocated={allocated}]")
    return used_cells / allocated


__all__ = ["Tiling", "crossbar_utilisation"]
