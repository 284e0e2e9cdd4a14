//! Seams over the operating system: the child launcher and reaper, cgroups, the user
//! databases, the agent's own resource limits, priority and memory (and the musl build's allocator).
//! Domain modules use these instead of calling libc themselves where a seam exists.

pub mod alloc;
pub mod cgroup;
pub mod launch;
pub mod limits;
pub mod memory;
pub mod priority;
pub mod reaper;
pub mod users;
