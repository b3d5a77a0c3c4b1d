"""Storage: the cube schema (declared once), Zarr I/O, run layout, importers."""

from .cube import (  # noqa: F401
    CubeError,
    RoutingWriter,
    clean_temporaries,
    completed_checkpoints,
    fingerprint,
    open_result,
    open_routing,
    prepare_routing,
    result_fingerprint,
    set_routing_attrs,
    write_result,
)
from .layout import RunLayout  # noqa: F401
from .schema import empty_routing, mock_cube, token_table, validate_routing  # noqa: F401
