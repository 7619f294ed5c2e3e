"""The core that training and serving share: how an image is made (`pipeline`, `sampling`), what conditions it
(`conditioning`), the folders on disk (`formats`), and the `aptp` command (`cli`). See ARCHITECTURE.md."""
