//! Seams over the operating system: the child launcher and reaper, cgroups, the user
//! databases, the agent's own resource limits, priority and memory.
//! Domain modules use these instead of calling libc themselves where a seam exists.

pub mod cgroup;
pub mod launch;
pub mod limits;
pub mod memory;
pub mod priority;
pub mod reaper;
pub mod users;
