"""Typed run configuration: the schema (:mod:`~aligndistil.config.schema`: sections, help,
allowed ranges) and its files (:mod:`~aligndistil.config.files`: YAML, ``key=value``
overrides, dumping). Everything a caller needs is importable from here."""

from aligndistil.config.files import (  # noqa: F401
    apply_overrides,
    dump_config,
    from_dict,
    help_text,
    load_config,
    load_yaml,
)
from aligndistil.config.schema import (  # noqa: F401
    DTYPES,
    SECTIONS,
    LOGGERS,
    Check,
    ConfigError,
    DataConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_paths,
    parse_chunk_size,
    validate,
)
