//! One module per subcommand of `charlm-trainer` (`train` is the `train` folder itself): each holds
//! the command's flags and its `run`, and leaves the work to the folders below.

pub mod bench;
pub mod generate_dataset;
pub mod launch;
pub mod plan;
pub mod prepare;
pub mod run;
pub mod sample;
