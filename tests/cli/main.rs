//! The `dorafuse` command line and the layer-case files it replays: `replay` on the PEFT
//! fixtures, `inspect` tables, and one-line errors for bad case files. One test binary for
//! the subject.

mod case_errors;
mod inspect_table;
mod output;
mod profile;
mod replay_fixtures;
