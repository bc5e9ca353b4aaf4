"""Strategy adapters: what LISA needs from DDP, FSDP1 and FSDP2, behind one small protocol."""
