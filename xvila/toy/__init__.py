"""The toy world: small scenes with matching image, video, sound and caption, and the
oracle that reads them back without learned models (`world`, `oracle`)."""
