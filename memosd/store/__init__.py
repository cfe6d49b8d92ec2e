"""The versioned cube store: RocksDB (rocksdict), its key schema and records."""
