"""Preference data: reading records, tokenising them, and collating batches."""

from aligndistil.data.formats import (  # noqa: F401
    DataError,
    DataReport,
    Example,
    FORMATS,
    KINDS,
    PreferenceCollator,
    Record,
    build_dataset,
    detect_format,
    load_records,
    parse_record,
    render_prompt,
    tokenize_examples,
    truncate_feature,
)
