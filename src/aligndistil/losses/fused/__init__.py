"""The fused, chunked path: token-level statistics from hidden states and head weights,
never ``B x T x V``. See :mod:`aligndistil.losses.fused.engine`."""

from aligndistil.losses.fused.engine import (  # noqa: F401
    AUTO_CHUNK_BYTES,
    DEFAULT_CHUNK_SIZE,
    HeadRows,
    STATS,
    aligndistil_loss,
    aligndistil_token_stats,
    auto_chunk_rows,
    check_chunk_size,
    fast_bf16_cpu,
    label_logps,
    label_logps_group,
    sparsepo_loss,
    tdpo_loss,
    teacher_tvd,
    token_level_stats,
)
from aligndistil.losses.fused.engine import _ReverseKL  # noqa: F401  (tests)
