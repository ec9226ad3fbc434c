"""SIF (Singularity Image Format) v2: format constants, reader, writer and listing.

Import the submodules directly (``hpcsif.sif.reader``, ``hpcsif.sif.writer`` …); this
package module stays empty so that importing it costs nothing.
"""
