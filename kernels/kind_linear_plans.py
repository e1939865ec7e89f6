"""Launch plans of the Triton kind_linear kernels: the tile sizes, program order, owner splits
and split counts their launchers (kernels/kind_linear.py, kernels/kind_linear_merged.py) take.

Pure Python (no torch, no Triton, nothing of kind_fast), so a CPU machine can plan a GPU
launch, and kind_fast/perf/perfmodel.py replays the same plans through its HBM-traffic model
(it re-exports every name here). The choices, with the reasons the traffic model and the static
audit (``python -m kind_fast.perf.audit``) give for them:

Active tailors
    ``tl.dot`` needs dims >= 16 and ``tl.arange`` powers of two, so K is padded to
    KP = next_pow2(max(K, 16)) (``padded_active``); KP <= MAX_ACTIVE = 128, because the
    BM×KP fp32 shrink accumulator lives in registers.

Row tiles (``row_tile``)
    On a GPU 128 rows (KP <= 64, T a multiple of 128) or 64 rows: Hopper's warpgroup MMA
    takes 64 rows per warpgroup. When T is a multiple of BM a tile lies in one sample and has
    one class; otherwise a 64-row tile handles each of the (at most MAX_SAMPLES_PER_TILE)
    samples it touches with row masks (``fused_unsupported`` names the shapes the fused
    kernels do not take). The interpreter uses 32/16-row tiles so that small test problems
    have several tiles and mixed tiles.

fused / rows (``plan_fused``: path M1's forward and dx, path M2, the shrink alone)
    With a dense term and outputs: one program per output tile, row-major, on a persistent
    grid of min(programs, SMs × CTAs/SM) CTAs; tile 0 of a row runs as G owner sub-tiles that
    also compute KP/NSH shrink columns each (``owner_split``: an owner does at most 3/4 of a
    tile's work, so it publishes its part of h before the row's other tiles need it). Every
    program of row r starts its K-loop at step (r·stride) mod steps (``k_rotation``,
    golden-ratio stride) so rows running together read different parts of the weight.
    Otherwise a program owns a row tile and NG of its N-tiles (``n_groups``: fewest waves ×
    work per program).

tailor_grad, tailor_reduce (the backward's dU_T, dV_T)
    Programs (tailor block, column block, split). ``plan_tailor_grad``: SPLIT fills the
    machine twice while the fp32 partials stay within 5 % of the compulsory bytes; compacted
    row-tile lists with block gates (2K <= N_T). ``plan_tailor_reduce``: a program per SM at
    least and no program walks more than REDUCE_ROWS row tiles. ``partials_supported``: when
    the dx pass writes the tailor-gradient partials at all (one class per tile, KP <= 64).

merged_gemm, merged_dw (path M3, ``plan_merged_gemm``, ``plan_merged_dw``)
    The segmented GEMM over cached merged weights: the largest row tile dividing T (one slot
    per tile), programs row-major with each row tile's K-loop rotated; dW one program per
    (128×128 tile, slot) walking row chunks of BR rows.

The reference machine (``REFERENCE``): 132 SMs (H100 SXM / H200). Launchers plan for it on
``meta`` tensors and for the device's SM count on a GPU; the CTAs/SM each plan assumes are
checked against the compiled kernels by the static audit (tests/test_audit.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Gpu", "H100", "REFERENCE", "MAX_ACTIVE", "MAX_SAMPLES_PER_TILE", "REDUCE_ROWS", "cdiv", "next_pow2",
           "padded_active", "row_tile", "samples_per_tile", "fused_unsupported", "FusedPlan", "owner_split",
           "k_rotation", "rotation_stride", "n_groups", "plan_fused", "TailorPlan", "plan_tailor_grad",
           "TailorReducePlan", "partials_supported", "plan_tailor_reduce", "MergedGemmPlan", "merged_row_tile",
           "plan_merged_gemm", "MergedDwPlan", "plan_merged_dw"]

MAX_ACTIVE = 128  # largest supported K (padded): the BM×KP fp32 shrink accumulator lives in registers


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    l2_bytes: int
    l2_effective: float = 0.5   # fraction of the L2 the traffic model may use (kind_fast/perf/perfmodel.py)

    @property
    def l2_budget(self) -> int:
        return int(self.l2_bytes * self.l2_effective)


H100 = Gpu("H100/H200 (132 SMs, 50 MB L2)", 132, 50 << 20)
REFERENCE = H100


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_active(k: int) -> int:
    """KP: K padded to a power of two >= 16 (tl.dot and tl.arange need it)."""
    return max(16, next_pow2(max(k, 1)))


MAX_SAMPLES_PER_TILE = 4  # mixed-class tiles: each sample's shrink is its own masked dot


def row_tile(t: int, kp: int, interpret: bool) -> tuple[int, bool]:
    """(BM, ONE_CLASS). On a GPU the row tile is 128 rows (KP <= 64) or 64 rows: Hopper's
    warpgroup MMA takes 64 rows per warpgroup, smaller tiles would fall back to mma.sync. When
    T is a multiple of BM a tile lies in one sample, so it has one class; otherwise it is a
    64-row tile that handles each of the samples it touches with row masks (see
    ``fused_unsupported`` for the limit). The interpreter uses 32/16-row tiles, so that small
    test problems have several tiles and mixed tiles."""
    if interpret:
        sizes = (32, 16)
        for bm in sizes:
            if t % bm == 0:
                return bm, True
        for bm in sizes:
            if t >= bm:
                return bm, False
        return 16, False
    if kp <= 64 and t % 128 == 0:
        return 128, True
    return 64, t % 64 == 0


def samples_per_tile(bm: int, t: int) -> int:
    """Most samples a BM-row tile touches (tiles start at multiples of BM)."""
    if bm % t == 0:
        return bm // t
    return (t + bm - 2) // t + 1


def fused_unsupported(t: int, k: int) -> str:
    """Why the fused GPU kernels do not take rows grouped T per sample with K active tailors
    ('' when they do): a 64-row tile may touch at most MAX_SAMPLES_PER_TILE samples, and only
    with KP <= 64 (the owners' per-sample shrink must stay shorter than a tile). The Triton
    backend runs the reference there (tiny T: x·V_T over all tailors as one GEMM is better)."""
    kp = padded_active(k)
    bm, one = row_tile(t, kp, interpret=False)
    if one:
        return ""
    spt = samples_per_tile(bm, t)
    if spt > MAX_SAMPLES_PER_TILE:
        return f"T={t} rows per sample: a {bm}-row tile would touch {spt} samples (> {MAX_SAMPLES_PER_TILE})"
    if kp > 64:
        return f"K={k} (KP={kp}) with tiles that mix samples (T={t})"
    return ""


# =====================================================================================
# Plans
# =====================================================================================
@dataclass(frozen=True)
class FusedPlan:
    tiles: bool          # True: tile programs (fused kernel); False: row programs (rows kernel)
    BM: int
    BN: int
    BK: int
    KP: int
    G: int               # tile programs: tile 0 of a row runs as G owner sub-tiles of BN/G columns
    NSH: int             # tile programs: owners that carry KP/NSH shrink columns each
    NG: int              # row programs: N-tile groups per row tile
    ONE_CLASS: bool
    SPT: int             # most samples one row tile touches (1 when ONE_CLASS)
    num_warps: int
    num_stages: int
    ctas_per_sm: int     # resident programs per SM the plan assumes (the audit checks it)
    m_tiles: int
    n_tiles: int
    grid: int = 0        # tile programs: persistent CTAs (<= SMs × ctas_per_sm), each looping over programs

    @property
    def programs(self) -> int:
        return self.m_tiles * ((self.G + self.n_tiles - 1) if self.tiles else self.NG)

    def as_dict(self) -> dict:
        return asdict(self)


def _tile_config(n: int, kd: int, kp: int, bm: int, interpret: bool, one: bool = True,
                 partials: bool = False) -> tuple[int, int, int, int]:
    """(BN, BK, num_warps, num_stages) of the pinned fused configs: BN 64 for narrow layers and
    KP >= 64 (a (BM, KP) shrink and a (KP, BN) expand operand beside a 128×128 accumulator
    spill), else 128 (and 128 for mixed-class tiles, whose owners need the room)."""
    if interpret:
        return 32, 32, 4, 1
    bn = 64 if ((n <= 512 and one) or kp >= 64) else 128
    bk = 64 if kd >= 64 else 32
    # 4 warps spill (static audit) at 128x128 tiles, at KP >= 64, with mixed-class tiles and
    # with the dx pass's tailor-gradient partials
    warps = 8 if (bm * bn >= 128 * 128 or kp >= 64 or not one or partials) else 4
    return bn, bk, warps, 3


def owner_split(kp: int, bn: int, n: int, spt: int = 1, du: bool = False) -> tuple[int, int]:
    """(G, NSH): tile 0 of every row runs as G owner sub-tiles of BN/G columns; the first NSH
    of them also compute KP/NSH columns of the shrink (>= 16 each, tl.dot's minimum), for each
    of the SPT samples of a mixed tile, and in the dx pass with tailor-gradient partials (``du``)
    as many columns of dU_T's partials again. An owner's MMA work is (BN/G + (1 + du)·SPT·KP/NSH)
    /BN of a tile; G is the smallest power of two that keeps it <= 3/4, so owners publish their
    part of h well before the other tiles of the row (run with them) reach their epilogue, and
    a one-class row costs exactly its tiles plus the shrink, (N + KP)/BN tile-times. Sub-tiles
    stay >= 16 columns (if none gets to 3/4, the split with the least owner work). A row of
    one tile (N <= BN) is one program: (1, 1)."""
    if n <= bn:
        return 1, 1
    best, best_work = (1, 1), float("inf")
    g = 2
    while bn // g >= 16:
        nsh = max(1, min(g, kp // 16))
        work = (bn // g + (2 if du else 1) * spt * (kp // nsh)) / bn
        if work < best_work - 1e-9:
            best, best_work = (g, nsh), work
        if work <= 0.75:
            break
        g *= 2
    return best


def k_rotation(r: int, steps: int) -> int:
    """First K-step of row tile r's K-loop (every program of the row runs its K-loop from
    there, modulo ``steps``). Rows running together start at well-spread steps (golden-ratio
    stride), so at any moment they read different parts of the shared weight and a weight
    chunk is touched every few tile-times rather than once per wave of programs: it stays in
    L2 even when programs run in lock-step. A second-order effect with the owner schedule
    (modelled DiT-XL/2.fc2 forward at M = 8192: 1.033x compulsory without it, 1.017x with
    it); with lock-step waves of equal programs it decides whether the weight is re-read."""
    return (r * rotation_stride(steps)) % max(steps, 1)


def rotation_stride(steps: int) -> int:
    return max(1, round(0.381966 * steps)) if steps > 1 else 0


def n_groups(m_tiles: int, n_tiles: int, shrink_cost: float, sms: int) -> int:
    """Row programs: N-tile groups per row tile. Programs = m_tiles·NG, each does
    ceil(n_tiles/NG) output tiles plus one shrink (shrink_cost in output tiles). Minimise
    waves × work per program; no group may be empty. Ties go to fewer groups."""
    best, best_t = 1, float("inf")
    for ng in range(1, n_tiles + 1):
        per = cdiv(n_tiles, ng)
        if cdiv(n_tiles, per) != ng:  # would leave an empty group
            continue
        t = cdiv(m_tiles * ng, sms) * (per + shrink_cost)
        if t < best_t - 1e-9:
            best, best_t = ng, t
    return best


def plan_fused(m: int, n: int, kd: int, k: int, t: int, *, has_base: bool = True, has_out: bool = True,
               partials: bool = False, interpret: bool = False, gpu: Gpu = REFERENCE,
               sms: int | None = None) -> FusedPlan:
    """The launch plan of the fused / rows kernel for one shape (M rows, N outputs, KD the
    reduction, K active tailors, T rows per sample; ``partials``: the dx pass that also writes
    the tailor-gradient partials). ``sms`` overrides the GPU's SM count (the launcher passes the
    device's; the interpreter uses 4 so that the split and persistent paths get exercised).
    Tile programs run on a persistent grid of min(programs, SMs × CTAs/SM) CTAs."""
    kp = padded_active(k)
    sms = gpu.sms if sms is None else sms
    bm, one = row_tile(t, kp, interpret)
    spt = 1 if one else samples_per_tile(bm, t)
    bn, bk, warps, stages = _tile_config(n, kd, kp, bm, interpret, one, partials)
    m_tiles, n_tiles = cdiv(m, bm), cdiv(n, bn)
    # resident programs per SM as compiled for sm_90 (tests/test_audit.py checks the DiT-XL/2
    # configs against the compiler): ~200-255 registers per thread, so one block of 8 warps
    # or two of 4 warps
    ctas = 1 if warps == 8 else 2
    if has_base and has_out:
        g, nsh = owner_split(kp, bn, n, spt, du=partials)
        programs = m_tiles * (g + n_tiles - 1)
        return FusedPlan(True, bm, bn, bk, kp, g, nsh, 1, one, spt, warps, stages, ctas, m_tiles, n_tiles,
                         min(programs, sms * ctas))
    if has_out:  # path M2: row programs, shrink then expand; the shrink costs KD/BN expand tiles
        ng = n_groups(m_tiles, n_tiles, kd / bn, sms * ctas)
    else:
        ng = 1
    return FusedPlan(False, bm, bn, bk, kp, 1, 1, ng, one, spt, warps, stages, ctas, m_tiles, n_tiles, m_tiles * ng)


@dataclass(frozen=True)
class TailorPlan:
    BM: int
    BT: int
    BO: int
    SPLIT: int
    SKIP: bool            # compacted per-block row-tile lists (block gates)
    ONE_CLASS: bool
    num_warps: int
    num_stages: int
    ctas_per_sm: int
    m_tiles: int
    t_blocks: int
    o_blocks: int

    def as_dict(self) -> dict:
        return asdict(self)


def plan_tailor_grad(m: int, o: int, n_t: int, k: int, t: int, *, interpret: bool = False,
                     gpu: Gpu = REFERENCE, sms: int | None = None) -> TailorPlan:
    """Launch plan of kind_linear_tailor_grad_kernel: out (N_T, O) = Σ over M rows.

    SPLIT: enough programs to fill the machine twice, but the fp32 partials (SPLIT·N_T·O·4
    bytes written, then read back) stay within 5 % of the compulsory bytes (M·O + M·K·2)·2."""
    sms = gpu.sms if sms is None else sms
    kp = padded_active(k)
    bm, one = row_tile(t, kp, interpret)
    bm = min(bm, 64)
    bt = 32 if interpret else (32 if n_t <= 32 else 64)
    skip = 2 * k <= n_t
    bo = 32 if interpret else (64 if o <= 512 else 128)
    warps, stages = (4, 1) if interpret else (4, 3)
    ctas = 4 if one else 2  # as compiled for sm_90: 128 registers one-class, ~180 with per-row classes
    t_blocks, o_blocks, m_tiles = cdiv(n_t, bt), cdiv(o, bo), cdiv(m, bm)
    split = max(1, min(m_tiles, cdiv(2 * sms * ctas, t_blocks * o_blocks)))
    compulsory = 2 * (m * o + m * k * 2)
    while split > 1 and split * n_t * o * 4 * 2 > 0.05 * compulsory:
        split -= 1
    split = cdiv(m_tiles, cdiv(m_tiles, split))  # no empty split
    return TailorPlan(bm, bt, bo, split, skip, one, warps, stages, ctas, m_tiles, t_blocks, o_blocks)


@dataclass(frozen=True)
class TailorReducePlan:
    BT: int               # tailors per program
    BO: int               # columns per program
    SPLIT: int            # programs sharing a (tailor block, column block): row tiles split in order
    num_warps: int
    num_stages: int
    programs: int         # dU_T and dV_T programs (the gate-gradient programs come on top)

    def as_dict(self) -> dict:
        return asdict(self)


REDUCE_ROWS = 128  # row tiles one reduction program walks at most (8 per step)


def partials_supported(t: int, k: int, interpret: bool = False) -> bool:
    """Whether the dx pass takes the tailor-gradient partials (``kernels.kind_linear.fused_dx``):
    one class per row tile (T a multiple of the row tile) and KP <= 64 (with KP = 128 an owner
    carrying the dU_T partials would run longer than a tile). Otherwise the backward runs the
    separate tailor-gradient kernels."""
    kp = padded_active(k)
    return kp <= 64 and row_tile(t, kp, interpret)[1]


def plan_tailor_reduce(m: int, n_out: int, n_in: int, n_t: int, k: int, t: int, bm: int, *, interpret: bool = False,
                       gpu: Gpu = REFERENCE, sms: int | None = None) -> TailorReducePlan:
    """Launch plan of kind_linear_tailor_reduce_kernel: programs (tailor block of BT, column
    block of BO, split) over dU_T (N_T × out) and dV_T (N_T × in). SPLIT splits the row tiles,
    in order, so that the launch has a program per SM at least (a DiT-XL/2 layer at M = 8192:
    6 · (18 + 18) = 216 programs, SPLIT = 1, no fp32 sums to add up) and no program walks more
    than REDUCE_ROWS row tiles (M = 65536: SPLIT = 4), never more splits than row tiles."""
    sms = gpu.sms if sms is None else sms
    bt, bo = (16, 16) if interpret else (16, 64)
    blocks = cdiv(n_t, bt) * (cdiv(n_out, bo) + cdiv(n_in, bo))
    m_tiles = cdiv(m, bm)
    split = max(1, min(m_tiles, max(cdiv(sms, max(blocks, 1)), cdiv(m_tiles, REDUCE_ROWS))))
    split = cdiv(m_tiles, cdiv(m_tiles, split))  # no empty split
    return TailorReducePlan(bt, bo, split, 4, 2, blocks * split)


# -------------------------------------------------------------------------------------
# Path M3 (kernels/kind_linear_merged.py): segmented GEMM over merged slot weights, and dW
# -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergedGemmPlan:
    BM: int
    BN: int
    BK: int
    GROUP_M: int          # row tiles per N band in launch order (the band's weight stays in L2)
    ROTATE: bool          # each row tile's K-loop starts at its own step (k_rotation)
    ONE_SLOT: bool        # T % BM == 0: a row tile lies in one sample, hence uses one slot
    num_warps: int
    num_stages: int
    ctas_per_sm: int      # resident programs per SM as compiled for sm_90 (the audit checks it)
    m_tiles: int
    n_tiles: int

    @property
    def programs(self) -> int:
        return self.m_tiles * self.n_tiles

    def as_dict(self) -> dict:
        return asdict(self)


def merged_row_tile(t: int, interpret: bool) -> tuple[int, bool]:
    """(BM, ONE_SLOT) of the segmented GEMM: the largest row tile dividing T, so that a tile
    uses one slot, else a tile that loops over the slots of the samples it touches. On a GPU
    only 128 and 64 rows (warpgroup MMA takes 64 rows per warpgroup; smaller tiles would run
    mma.sync), so T = 16 or 32 (DiT/8, DiT/4 at 128 px) runs 64-row tiles that loop over their
    slots: in a CFG batch (halves of one slot each) only the tile straddling the halves pays
    for a second K-loop. The interpreter uses 32/16-row tiles (small test problems)."""
    sizes = (32, 16) if interpret else (128, 64)
    for bm in sizes:
        if t % bm == 0:
            return bm, True
    return sizes[-1], False


def plan_merged_gemm(m: int, n: int, kd: int, t: int, *, interpret: bool = False) -> MergedGemmPlan:
    """Launch plan of kind_linear_merged_gemm_kernel (out (M, N) = a (M, KD) · B[slot]).

    128×128×64 tiles with 8 warps and 4 stages when a 128-row tile lies in one sample (the
    4-stage ring, 128 KB of shared memory, leaves one program per SM), else 64-row tiles,
    4 warps, 3 stages (three per SM); 64 columns for N <= 64. Programs in row-major order
    (GROUP_M = 1: a row tile's N-tiles run together and read its A block from HBM once) and
    every row tile's K-loop starts at its own step (``k_rotation``), so the rows running
    together read different parts of the weights and they stay in L2. The traffic model
    (``traffic_merged_gemm``) chose this against grouped orders and two programs per SM: at
    DiT-XL/2.fc2 (KD = 4608) a wave's A blocks alone exceed the L2 budget, and grouped or
    unrotated orders re-read the weights every wave (up to 1.4-1.8x the compulsory bytes).
    The tightest modelled pass is fc2 of a CFG batch of B = 32 (1.145x): around the boundary
    of the two halves both slots' weights (21 MB) compete with the A blocks in flight."""
    bm, one = merged_row_tile(t, interpret)
    if interpret:
        return MergedGemmPlan(bm, 32, 32, 1, True, one, 4, 1, 1, cdiv(m, bm), cdiv(n, 32))
    bn = 128 if n > 64 else 64
    bk = 64 if kd >= 64 else 32
    if bm * bn >= 128 * 128:
        return MergedGemmPlan(bm, bn, bk, 1, True, one, 8, 4, 1, cdiv(m, bm), cdiv(n, bn))
    return MergedGemmPlan(bm, bn, bk, 1, True, one, 4, 3, 3, cdiv(m, bm), cdiv(n, bn))


@dataclass(frozen=True)
class MergedDwPlan:
    BN: int
    BK: int
    BR: int               # rows per K-step of the long-K GEMM dW[s] = Σ gᵀ·x over slot s's rows
    FULL: bool            # T % BR == 0: no row chunk crosses a sample's end (no tail mask)
    num_warps: int
    num_stages: int
    ctas_per_sm: int
    n_tiles: int
    k_tiles: int

    def as_dict(self) -> dict:
        return asdict(self)


def plan_merged_dw(n: int, kd: int, t: int, *, interpret: bool = False) -> MergedDwPlan:
    """Launch plan of kind_linear_merged_dw_kernel: one program per (128×128 tile of dW[s],
    slot s), walking the row chunks of slot s's samples. BR: the largest of 64/32/16 dividing
    T (else 16, the last chunk of each sample masked)."""
    sizes = (32, 16) if interpret else (64, 32, 16)
    br = next((r for r in sizes if t % r == 0), sizes[-1])
    if interpret:
        return MergedDwPlan(32, 32, br, t % br == 0, 4, 1, 1, cdiv(n, 32), cdiv(kd, 32))
    return MergedDwPlan(128, 128, br, t % br == 0, 8, 3, 2, cdiv(n, 128), cdiv(kd, 128))
