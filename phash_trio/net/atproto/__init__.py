"""The AT Protocol side we read from strangers: identifier syntax, DID -> PDS resolution, blob
downloads (DESIGN §5)."""
