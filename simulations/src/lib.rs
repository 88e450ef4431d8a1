//! starling-simulations: the research side of Starling. It sits above every other crate, so it is where
//! the benchmark binary `starling-bench` lives (its measurements are in [`bench`]) and where the
//! multi-client simulator will live.
//!
//! What must never live here: code a device or the coordinator needs at run time (nothing depends on this
//! crate).

pub mod bench;
