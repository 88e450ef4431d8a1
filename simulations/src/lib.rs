//! starling-simulations: the research side of Starling. It sits above every other crate, so it is where
//! the multi-client simulator `starling-sim` lives ([`sim`]: the deployed coordinator and device logic on
//! a simulated clock) and the benchmark binary `starling-bench` (its measurements are in [`bench`]).
//!
//! What must never live here: code a device or the coordinator needs at run time (nothing depends on this
//! crate).

pub mod bench;
pub mod sim;
