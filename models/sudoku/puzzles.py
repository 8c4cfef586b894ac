"""Sudoku grids and puzzles: random solved grids, unique-solution puzzles, validity-preserving symmetries.

Grids are strings of 81 characters, row by row: digits 1-9, and '.' for a blank in a puzzle.
The solver is a bitmask backtracker with the most-constrained-cell heuristic; it counts solutions up to a
limit, which is what uniqueness checks need.
"""

from __future__ import annotations

import random

ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
PEERS = [sorted({p for unit in (ROWS[i // 9], COLS[i % 9], BOXES[(i // 27) * 3 + (i % 9) // 3]) for p in unit} - {i})
         for i in range(81)]  # fmt: skip
ALL = 0x3FE  # bits 1..9


def _candidates(cells: list[int], i: int) -> int:
    used = 0
    for p in PEERS[i]:
        used |= 1 << cells[p]
    return ALL & ~used


def _search(cells: list[int], on_solution) -> bool:
    """Backtrack over the most constrained blank cell; `on_solution(cells)` returns True to stop."""
    best, best_mask, best_n = -1, 0, 10
    for i in range(81):
        if cells[i] == 0:
            mask = _candidates(cells, i)
            n = bin(mask).count("1")
            if n < best_n:
                best, best_mask, best_n = i, mask, n
                if n <= 1:
                    break
    if best == -1:
        return on_solution(cells)
    for d in range(1, 10):
        if best_mask & (1 << d):
            cells[best] = d
            if _search(cells, on_solution):
                cells[best] = 0
                return True
    cells[best] = 0
    return False


def _cells(puzzle: str) -> list[int] | None:
    """Puzzle as ints (0 = blank), or None when two givens clash."""
    cells = [0 if ch == "." else int(ch) for ch in puzzle]
    for i, v in enumerate(cells):
        if v and any(cells[p] == v for p in PEERS[i]):
            return None
    return cells


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of solutions, counted up to `limit`."""
    cells = _cells(puzzle)
    if cells is None:
        return 0
    count = 0

    def record(solved: list[int]) -> bool:
        nonlocal count
        count += 1
        return count >= limit

    _search(cells, record)
    return count


def solve(puzzle: str) -> str | None:
    """The first solution found, or None."""
    cells = _cells(puzzle)
    if cells is None:
        return None
    found: list[str] = []

    def record(solved: list[int]) -> bool:
        found.append("".join(map(str, solved)))
        return True

    _search(cells, record)
    return found[0] if found else None


def random_grid(rng: random.Random) -> str:
    """A uniformly shuffled solved grid (random backtracking fill)."""
    cells = [0] * 81

    def fill(i: int) -> bool:
        if i == 81:
            return True
        digits = [d for d in range(1, 10) if _candidates(cells, i) & (1 << d)]
        rng.shuffle(digits)
        for d in digits:
            cells[i] = d
            if fill(i + 1):
                return True
        cells[i] = 0
        return False

    fill(0)
    return "".join(map(str, cells))


def is_valid_solution(grid: str, puzzle: str | None = None) -> bool:
    """A complete grid obeying every row, column and box, and agreeing with the puzzle's givens."""
    if len(grid) != 81 or any(ch not in "123456789" for ch in grid):
        return False
    if any(len({grid[i] for i in unit}) != 9 for unit in ROWS + COLS + BOXES):
        return False
    return puzzle is None or all(p in ".0" or p == g for p, g in zip(puzzle, grid, strict=True))


def make_puzzle(solution: str, givens: int, rng: random.Random) -> str:
    """Remove cells in random order while the solution stays unique, down to `givens` cells (or as far as
    uniqueness allows)."""
    cells = list(solution)
    order = list(range(81))
    rng.shuffle(order)
    filled = 81
    for i in order:
        if filled <= givens:
            break
        keep, cells[i] = cells[i], "."
        if count_solutions("".join(cells)) != 1:
            cells[i] = keep
        else:
            filled -= 1
    return "".join(cells)


def transform(grid: str, rng: random.Random) -> tuple:
    """A random validity-preserving symmetry: digit relabelling, row swaps within bands, column swaps within
    stacks, band swaps, stack swaps and transposition. Returns a function-like tuple for `apply`."""
    relabel = list("123456789")
    rng.shuffle(relabel)
    bands, stacks = rng.sample(range(3), 3), rng.sample(range(3), 3)
    rows = [b * 3 + r for b in bands for r in rng.sample(range(3), 3)]
    cols = [s * 3 + c for s in stacks for c in rng.sample(range(3), 3)]
    return relabel, rows, cols, rng.random() < 0.5


def apply(grid: str, sym: tuple) -> str:
    """Apply a symmetry from `transform` to a grid or puzzle ('.' stays '.')."""
    relabel, rows, cols, transpose = sym
    out = []
    for r in range(9):
        for c in range(9):
            rr, cc = (cols[c], rows[r]) if transpose else (rows[r], cols[c])
            ch = grid[rr * 9 + cc]
            out.append(ch if ch == "." else relabel[int(ch) - 1])
    return "".join(out)


def mask_random(solution: str, givens: int, rng: random.Random) -> str:
    """Blank all but `givens` random cells (no uniqueness check: cheap training puzzles)."""
    keep = set(rng.sample(range(81), givens))
    return "".join(ch if i in keep else "." for i, ch in enumerate(solution))


def to_lines(grid: str) -> str:
    """The answer format: 9 lines of 9 digits."""
    return "\n".join(grid[r * 9 : r * 9 + 9] for r in range(9))
