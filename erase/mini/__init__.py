"""The miniature world shipped with erase: a procedural image world, its trained pipeline and its CLIP judge."""
