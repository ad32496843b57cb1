//! Library side of the `sqil` command line: the pieces its subcommands share with tests.

pub mod inspect;
pub mod npy;
