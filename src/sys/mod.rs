//! Seams over the operating system: the child reaper and the user databases.
//! Domain modules use these instead of calling libc themselves where a seam exists.

pub mod cgroup;
pub mod reaper;
pub mod users;
