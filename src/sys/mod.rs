//! Seams over the operating system: the child reaper, the user databases, cgroups and
//! the agent's resource limits.
//! Domain modules use these instead of calling libc themselves where a seam exists.

pub mod cgroup;
pub mod limits;
pub mod reaper;
pub mod users;
