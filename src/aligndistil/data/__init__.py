"""Preference data: reading records (:mod:`~aligndistil.data.records`), tokenising them
(:mod:`~aligndistil.data.tokenize`), and padding and collating batches
(:mod:`~aligndistil.data.collate`)."""

from aligndistil.data.collate import PreferenceCollator, pad_right, pad_with_mask  # noqa: F401
from aligndistil.data.records import (  # noqa: F401
    ACCEPTED_FORMATS,
    FORMATS,
    KINDS,
    DataError,
    DataReport,
    Example,
    HUB_PREFIX,
    Record,
    detect_format,
    load_records,
    parse_record,
)
from aligndistil.data.tokenize import (  # noqa: F401
    build_dataset,
    chat_template_rule,
    render_prompt,
    resolve_chat_template,
    tokenize_examples,
    truncate_feature,
)
