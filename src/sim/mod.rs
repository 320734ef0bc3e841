//! The Apple simulator (being written).
