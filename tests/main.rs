//! The integration tests, one binary (each test binary links libtorch again).

mod app;
mod checkpoint;
mod cli;
mod common;
mod masks;
mod params;
mod sampling;
mod text;
mod trainer;
mod training;
mod world;
