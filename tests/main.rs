//! The integration tests, one binary (each test binary links libtorch again).

#[cfg(feature = "app")]
mod app;
mod checkpoint;
mod cli;
mod common;
mod faults;
mod fuzz;
mod judged;
mod kernels;
mod masks;
mod openai_dvae;
mod params;
mod pipeline;
mod sampling;
mod text;
mod trainer;
mod training;
mod world;
