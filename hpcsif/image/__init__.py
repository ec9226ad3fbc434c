"""OCI image model, blob store and layer flattening."""
