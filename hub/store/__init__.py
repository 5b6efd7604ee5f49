"""Storage: one interface (base.Store), two backends (sqlite, mongo). open_store(url) picks one."""
