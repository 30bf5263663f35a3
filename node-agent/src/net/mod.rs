//! Sockets and bytes, with no knowledge of the mesh: making sockets inside a
//! pod's network namespace (`netns`), listening and connecting from there
//! (`socket`), and moving bytes between two sockets (`copy`) through buffers
//! held only while bytes move (`buffer`). Every role that proxies reuses these;
//! none of them imports anything of the mesh.

pub(crate) mod buffer;
pub mod copy;
pub mod limit;
pub mod netns;
pub mod route;
pub mod socket;

pub use netns::Netns;
