//! The pipeline's stages, side by side. None imports another: they talk
//! through the store and the wake-ups in [`crate::runtime::context`].

pub mod admin;
pub mod drift;
pub mod listen;
pub mod release;
pub mod submit;
pub mod track;
pub mod users;
