//! Model-weight cache (in progress).

pub mod buf;
pub mod crc;
pub mod fetch;
pub mod index;
pub mod journal;
pub mod sample;
pub mod source;
pub mod spec;
pub mod verify;
