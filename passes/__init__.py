"""Graph rewrites (AION, hyper-connections, ADyT, growth), one file each, added by later work."""
