//! L4 authorization (being written).
