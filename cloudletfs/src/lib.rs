//! cloudletfs: the FUSE filesystem that serves a synthesized VM lazily (built in the next issue).
