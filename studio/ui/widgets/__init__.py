"""Reusable widgets: drop zone, busy indicator, banners, field editors, loss plot, image gallery."""
