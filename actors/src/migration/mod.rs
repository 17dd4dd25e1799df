//! The two sides of a live migration and the exchange between them.
//!
//! The [`source`] records the migration in the store, asks the [`target`] to
//! `Prepare` a guest shell, copies memory in pre-copy rounds over the page
//! stream, pauses the guest, sends the last pages and the device state with
//! `Complete`, and — once the target has verified the copy — commits the
//! switchover through the store and tells the target to `Resume`. Every
//! message of that exchange is in [`protocol`].
//!
//! The rule that keeps one owner: only the source proposes the switchover.
//! Before that proposal it may always resume its own guest; after it, only if
//! the store says the migration was aborted, and it stays paused for as long
//! as the store cannot tell it. The target resumes only when its own replica
//! of the store shows the switchover committed to it. So at any moment at
//! most the store's owner runs the VM.

pub mod progress;
pub mod protocol;
pub mod source;
pub mod target;
